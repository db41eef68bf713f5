import json
import random

import pytest

from fleetmind.sim import basemodel
from fleetmind.sim import continual_world as CW
from fleetmind.sim import world as W


def test_render_matches_the_chat_template() -> None:
    tokenizer = basemodel.build_tokenizer()
    cfg = basemodel.TrainConfig()
    rng = random.Random(0)
    for facts in (1, 3, 6):
        messages = basemodel.training_session(rng, facts, cfg)
        ids, weights = basemodel.render(messages, tokenizer.get_vocab(), 3.0)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(weights) == len(ids) and max(weights) == 3.0


def test_every_world_word_is_one_known_token() -> None:
    tokenizer = basemodel.build_tokenizer()
    world = W.make_world(W.WorldSpec(seed=5))
    text = " ".join(m["content"] for site in world.sites for s in site.sessions
                    for m in s["messages"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(text.split())


def test_committed_model_is_the_default_recipe(toy_model_dir) -> None:
    report = json.loads((toy_model_dir / "report.json").read_text())
    assert report["config_digest"] == basemodel.TrainConfig().digest()
    weights = toy_model_dir / "model.safetensors"
    assert weights.stat().st_size <= 5 * 2**20


def test_toy_model_reads_its_context_and_knows_nothing_closed_book(toy_model) -> None:
    model, tokenizer = toy_model
    # 200 tasks per size, as the build reports: at 100 the 2-fact rate (about 0.92) sits
    # within one standard deviation of the 0.9 line
    report = basemodel.measure(model, tokenizer, basemodel.heldout_world(tasks_per_size=200))
    assert report["incontext_accuracy"] >= 0.9  # 1 and 2 facts (1.000 / 0.895 measured)
    assert min(report["incontext_by_facts"][size] for size in ("1", "2")) >= 0.85
    # chance is 1/40; 200 probes: 0.08 is > 5 standard deviations above it
    assert report["closed_book_accuracy"] <= 0.08


def test_toy_model_recalls_its_background_knowledge_closed_book(toy_model) -> None:
    model, tokenizer = toy_model
    known = basemodel.background_facts(basemodel.TrainConfig().background_attributes)
    assert len(known) == 2 * W.BACKGROUND_NAMES
    assert basemodel.fact_accuracy(model, tokenizer, known) >= 0.95  # 1.000 measured
    # and nothing of them leaks into a world: its names are never background names
    world = CW.make_continual_world(CW.ContinualSpec(seed=0, sites=2, rounds=2))
    assert not {f.fact.name for f in world.facts} & set(W.lexicon().background_names)


def test_toy_model_reads_every_probe_form_in_context(toy_model) -> None:
    model, tokenizer = toy_model
    # Measured on the committed model (its report.json): strict 1.000 / 0.895,
    # attribute_first 1.000 / 0.905 on 1 / 2 facts. Per form, 1 and 2 facts together reach
    # 0.90 (issue 17's target) and neither size falls below 0.85.
    general = basemodel.heldout_world(200).general
    for form in W.PROBE_FORMS:
        rates = []
        for size in (1, 2):
            tasks = [([W.Fact(**f) for f in task["facts"]], W.Fact(**task["asked"]))
                     for task in general if len(task["facts"]) == size]
            rates.append(basemodel.context_accuracy(model, tokenizer, tasks, form))
        assert sum(rates) / 2 >= 0.9 and min(rates) >= 0.85, (form, rates)
    # and on a continual world's own sessions (distinct attributes), every stated fact asked
    world = CW.make_continual_world(CW.ContinualSpec(seed=0, sites=2, rounds=3))
    tasks = [(list(rec.stated), fact) for recs in world.records.values() for rec in recs
             if rec.kind == "new" for fact in rec.stated]
    for form in W.PROBE_FORMS:
        assert basemodel.context_accuracy(model, tokenizer, tasks, form) >= 0.95, form


def test_answer_check_fails_a_wrong_answer(toy_model) -> None:
    model, tokenizer = toy_model
    fact = W.Fact("moukrain", "color", W.lexicon().values["color"][0])
    wrong = W.Fact("moukrain", "color", W.lexicon().values["color"][1])
    prompt = W.context_prompt([fact], fact)
    assert basemodel.answer_correct(model, tokenizer, [prompt, prompt],
                                    [W.answer(fact), W.answer(wrong)]) == [True, False]


@pytest.mark.slow
def test_build_toy_reproduces_a_model_that_meets_the_targets(tmp_path) -> None:
    report = basemodel.build_toy(tmp_path / "toy", progress=False)
    assert report["incontext_accuracy"] >= 0.9
    assert report["closed_book_accuracy"] <= 0.08
