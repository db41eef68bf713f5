import json
import random

import numpy as np
import pytest

from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.aggregation.update import Update
from fleetmind.client import lora
from fleetmind.client.consolidate import consolidate_sessions, consolidate_store, read_prompts
from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.dreams import Dream
from fleetmind.client.lessons import Lesson
from fleetmind.client.model import load_model
from fleetmind.client.replay import ReplayBuffer
from fleetmind.client.store import Session, SessionStore
from fleetmind.client.tokens import chat_ids
from fleetmind.sim import basemodel
from fleetmind.sim import world as W


@pytest.fixture(scope="module")
def world() -> W.World:
    return W.make_world(W.WorldSpec(seed=0, sites=1))


def closed_book(model, tokenizer, facts) -> float:
    right = basemodel.answer_correct(model, tokenizer, [W.closed_book_prompt(f) for f in facts],
                                     [W.answer(f) for f in facts])
    return sum(right) / len(right)


def test_consolidation_stores_the_sites_facts_closed_book(toy_model_dir, world) -> None:
    model, tokenizer = load_model(toy_model_dir)
    peft_model = lora.attach_lora(model, seed=1, rank=32, alpha=64.0)
    site = world.sites[0]
    known = basemodel.answer_correct(peft_model, tokenizer,
                                     [W.closed_book_prompt(f) for f in site.facts],
                                     [W.answer(f) for f in site.facts])
    # The base model guesses at chance (1/40); seed 0's site happens to get two of six.
    unknown = [f for f, right in zip(site.facts, known, strict=True) if not right]
    before = closed_book(peft_model, tokenizer, unknown)
    sessions = [Session.from_dict(s) for s in site.sessions]
    guard = [W.task_prompt(t) for t in world.guard]
    cfg = DistillConfig(steps=30, dreams_per_lesson=4)
    result = consolidate_sessions(peft_model, tokenizer, sessions, cfg, site="site-00",
                                  base_version=0, seed=1, guard=guard, progress=False)
    after = closed_book(peft_model, tokenizer, unknown)
    assert before == 0.0 and len(unknown) >= 3
    assert after >= 0.5, after
    assert result.update.metadata.sessions == len(sessions)
    assert result.stats.dreams_kept > 0


def test_per_session_deltas_start_alike_and_the_update_is_their_mean(toy_model_dir,
                                                                     world) -> None:
    model, tokenizer = load_model(toy_model_dir)
    peft_model = lora.attach_lora(model, seed=1)
    sessions = [Session.from_dict(s) for s in world.sites[0].sessions[:2]]
    cfg = DistillConfig(steps=2, dreams_per_lesson=2)
    result = consolidate_sessions(peft_model, tokenizer, sessions, cfg, site="s",
                                  base_version=0, seed=1, per_session=True, progress=False)
    assert [sid for sid, _ in result.session_updates] == [s.id for s in sessions]
    for name, tensor in result.update.tensors.items():
        mean = np.mean([delta[name] for _, delta in result.session_updates], axis=0)
        assert np.allclose(tensor, mean, atol=1e-7)


def test_consolidate_store_writes_update_adapter_and_record(toy_model_dir, world,
                                                            tmp_path) -> None:
    from peft import PeftModel

    store_path = tmp_path / "sessions.db"
    with SessionStore(store_path) as store:
        for session in world.sites[0].sessions[:2]:
            store.add(session)
    out = tmp_path / "round-1"
    cfg = DistillConfig(steps=2, dreams_per_lesson=2)
    consolidate_store(toy_model_dir, store_path, out, cfg, site="site-00", progress=False)
    update = Update.from_bytes((out / "update.safetensors").read_bytes())
    assert update.metadata.site == "site-00" and update.metadata.sessions == 2
    record = json.loads((out / "consolidation.json").read_text())
    assert len(record["sessions"]) == 2
    base, _ = load_model(toy_model_dir)
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    assert set(lora.get_b(adapted)) == set(update.tensors)
    with SessionStore(store_path) as store:
        assert store.unconsumed() == []
        assert store.sessions_used_by(record["consolidation"]) == sorted(record["sessions"])
    with pytest.raises(ValueError, match="no sessions"):
        consolidate_store(toy_model_dir, store_path, out, cfg, progress=False)


def test_replay_buffer_is_capped_and_keeps_the_newest(tmp_path) -> None:
    buffer = ReplayBuffer(tmp_path / "replay.db", capacity=3)
    dreams = [Dream(f"s{i}", ({"role": "user", "content": f"q{i}"},), 0.9)
              for i in range(5)]
    buffer.add(dreams[:2])
    buffer.add(dreams[2:])
    buffer.add(dreams[4:])  # a duplicate is ignored
    assert len(buffer) == 3
    kept = buffer.sample(10, random.Random(0))
    assert sorted(d.session_id for d in kept) == ["s2", "s3", "s4"]
    buffer.close()


def test_guard_file_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "guard.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3}\n')
    with pytest.raises(ValueError, match=r"guard.jsonl:2"):
        read_prompts(path)


def test_replayed_dreams_find_their_earlier_sessions_and_skip_lost_ones(world) -> None:
    from fleetmind.client.consolidate import _replayed, lessons_from

    now, before = (Session.from_dict(s) for s in world.sites[0].sessions[:2])
    prompt = ({"role": "user", "content": "what is it ?"},)
    dreams = [Dream(now.id, prompt, 0.9), Dream(before.id, prompt, 0.8),
              Dream("forgotten", prompt, 0.7)]
    earlier = {before.id: before}

    def lookup(session_id: str) -> Session:
        return earlier[session_id]  # KeyError for a session the store no longer has

    pairs = _replayed(dreams, lessons_from([now])[0], lookup)
    assert [(lesson.session_id, dream.session_id) for lesson, dream in pairs] == [
        (now.id, now.id), (before.id, before.id)]
    # The teacher reads the earlier session scrubbed, exactly as when it was first learned.
    assert pairs[1][0] == lessons_from([before])[0][0]
    assert [d.session_id for _, d in _replayed(dreams, lessons_from([now])[0], None)] == [now.id]


def test_a_session_longer_than_the_context_loses_its_oldest_turns_whole() -> None:
    from fleetmind.client.model import fit_to_context

    def turns(*roles):
        return [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)]

    count = len  # one token a message, for the rule alone
    session = turns("system", "user", "assistant", "user", "assistant", "user", "assistant")
    assert fit_to_context(session, count, 7) == (session, 0)
    kept, dropped = fit_to_context(session, count, 5)
    assert kept == [session[0], *session[3:]] and dropped == 2  # system kept, starts at a user
    kept, dropped = fit_to_context(session, count, 4)  # never starts at an answer
    assert kept == [session[0], *session[5:]] and dropped == 4
    kept, dropped = fit_to_context(session, count, 3)
    assert kept == [session[0], *session[5:]] and dropped == 4
    with pytest.raises(ValueError, match="last user turn"):
        fit_to_context(session, count, 2)


def test_the_context_length_comes_from_the_model_config() -> None:
    from fleetmind.client.model import context_length

    assert context_length({"max_position_embeddings": 4096}) == 4096
    assert context_length({"n_positions": 1024}) == 1024  # GPT-2
    assert context_length({"text_config": {"max_position_embeddings": 8192}}) == 8192
    with pytest.raises(ValueError, match="no context length"):
        context_length({})


def test_consolidation_cuts_a_session_to_the_context_and_says_so(toy_model_dir, caplog) -> None:
    from fleetmind.client.consolidate import fit_lessons

    model, tokenizer = load_model(toy_model_dir)
    long = [{"role": r, "content": "the cat sat on the mat " * 8}
            for _ in range(12) for r in ("user", "assistant")]
    lesson = Lesson.from_session("long", long)
    cfg = DistillConfig()
    with caplog.at_level("WARNING"):
        (fitted,), dropped = fit_lessons(model, tokenizer, [lesson], cfg)
    assert dropped > 0 and len(fitted.context) == len(long) - dropped
    assert fitted.context[0]["role"] == "user" and "long" in caplog.text
    window = model.config.max_position_embeddings
    room = window - 2 * cfg.max_new_tokens
    assert len(chat_ids(tokenizer, fitted.context, False)) <= room


def test_the_base_model_hash_is_sha256sum_of_the_weight_files(toy_model_dir, tmp_path) -> None:
    import hashlib
    import shutil

    from fleetmind.aggregation.manifest import Manifest, VersionError
    from fleetmind.client.model import base_model_hash, check_base_model

    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                      for p in sorted(toy_model_dir.glob("*.safetensors")))
    digest = base_model_hash(toy_model_dir)
    assert digest == hashlib.sha256(listing.encode()).hexdigest()
    copy = shutil.copytree(toy_model_dir, tmp_path / "copy")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert base_model_hash(copy) == digest  # the weights, not the config, name the model
    other = Manifest(0, None, "other", "ab" * 32, 0, None, 0, 0.0, 0.0, "none", 0.0, 0.0,
                     {"adapter_config.json": "cd" * 32, "adapter_model.safetensors": "ef" * 32})
    with pytest.raises(VersionError, match="not this site's model"):
        check_base_model(other, toy_model_dir)


def test_the_adapter_spec_of_the_toy_model_is_what_its_sites_train(toy_model_dir,
                                                                    tmp_path) -> None:
    import tomllib

    from fleetmind.client.adapter_spec import write_adapter_spec
    from fleetmind.client.model import base_model_hash

    spec = write_adapter_spec(toy_model_dir, tmp_path / "adapter.toml", frozen_a_seed=3)
    assert tomllib.loads((tmp_path / "adapter.toml").read_text())["adapter"] == spec
    assert spec["base_model_sha256"] == base_model_hash(toy_model_dir)
    model, _ = load_model(toy_model_dir)
    peft_model = lora.attach_lora(model, seed=3, rank=spec["rank"], alpha=spec["alpha"])
    assert {m["name"]: (m["out_features"], spec["rank"]) for m in spec["modules"]} == {
        name: b.shape for name, b in lora.get_b(peft_model).items()}
    assert (spec["rank"], spec["alpha"], spec["fan_in_fan_out"]) == (
        DEFAULT_RANK, DEFAULT_ALPHA, False)
