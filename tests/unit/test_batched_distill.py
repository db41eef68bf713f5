"""Batched distillation (issue 17 item 3): many privacy units share every pass, each with its
own delta of B (`lora.UnitDeltas`), and each unit's delta is what distilling it alone gives."""

import dataclasses

import numpy as np
import pytest
import torch

from fleetmind.client import distill, lora
from fleetmind.client.consolidate import consolidate_sessions
from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.dreams import Dream
from fleetmind.client.lessons import Lesson
from fleetmind.client.model import load_model
from fleetmind.client.sampling import SHARED_START_MIN, common_start, read_prompts
from fleetmind.client.scoring import completion_logits
from fleetmind.client.store import Session
from fleetmind.sim import world as W


@pytest.fixture
def student(toy_model_dir):
    model, tokenizer = load_model(toy_model_dir)
    return lora.attach_lora(model, seed=5, rank=4, targets=("down_proj",)), tokenizer


def random_b(model, scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (scale * rng.standard_normal(b.shape)).astype(np.float32)
            for name, b in lora.get_b(model).items()}


def test_each_row_adds_its_own_units_delta_to_the_global_adapter(student) -> None:
    model, _ = student
    global_b = random_b(model, 0.05, 0)
    lora.set_b(model, global_b)
    ids = torch.tensor([[3, 9, 27, 81, 5]] * 3)
    deltas = lora.UnitDeltas(model, 2)
    try:
        unit_b = [random_b(model, 0.2, 1), random_b(model, 0.2, 2)]
        with torch.no_grad():
            for name, delta in deltas.deltas.items():
                for u in range(2):
                    delta[u] = torch.from_numpy(unit_b[u][name])
            with lora.routed(model, torch.tensor([[0], [1], [-1]])):
                routed = model(input_ids=ids).logits
            unrouted = model(input_ids=ids).logits
    finally:
        deltas.detach()
    with torch.no_grad():
        expected = []
        for u in range(2):
            lora.set_b(model, {n: global_b[n] + unit_b[u][n] for n in global_b})
            expected.append(model(input_ids=ids[:1]).logits[0])
        lora.set_b(model, global_b)
        expected.append(model(input_ids=ids[:1]).logits[0])
    for row in range(3):  # units 0 and 1, then a row of no unit: the global adapter
        assert torch.allclose(routed[row], expected[row], atol=1e-5)
        assert not torch.allclose(routed[row], expected[(row + 1) % 3], atol=1e-3)
    assert torch.allclose(unrouted[0], expected[2], atol=1e-5)  # no route: no unit's delta


def test_a_units_loss_moves_only_its_own_delta(student) -> None:
    model, _ = student
    deltas = lora.UnitDeltas(model, 3)
    try:
        with torch.no_grad():
            for delta in deltas.parameters():
                delta.normal_(0, 0.1)
        with lora.routed(model, torch.tensor([[0], [2]])):
            logits = model(input_ids=torch.tensor([[4, 8, 15, 16], [23, 42, 7, 1]])).logits
        logits[0].sum().backward()  # unit 0's row only
        for delta in deltas.parameters():
            assert delta.grad[0].abs().sum() > 0
            assert delta.grad[1:].abs().sum() == 0
    finally:
        deltas.detach()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_B" in n)


def test_where_a_trains_each_row_adds_its_own_units_factors(student) -> None:
    """FedIT's units: a row of unit u runs as the adapter (A + E_u, B + D_u) would alone."""
    model, _ = student
    global_b = random_b(model, 0.05, 0)
    global_a = lora.get_b(model, "A")
    lora.set_b(model, global_b)
    lora.freeze_a(model, frozen=False)
    ids = torch.tensor([[3, 9, 27, 81, 5]] * 2)
    deltas = lora.UnitDeltas(model, 2)
    rng = np.random.default_rng(4)
    try:
        assert deltas.trains_a
        with torch.no_grad():
            for store in (deltas.deltas, deltas.a_deltas):
                for delta in store.values():
                    delta.copy_(torch.from_numpy(
                        (0.2 * rng.standard_normal(delta.shape)).astype(np.float32)))
            with lora.routed(model, torch.tensor([[0], [1]])):
                routed = model(input_ids=ids).logits
        unit_b, unit_a = deltas.unit_deltas(), deltas.unit_deltas("A")
    finally:
        deltas.detach()
    assert len(lora.trainable_parameters(model)) == 2 * len(global_b)  # A trains again
    with torch.no_grad():
        for u in range(2):
            lora.set_b(model, {n: global_b[n] + unit_b[u][n] for n in global_b})
            lora.set_b(model, {n: global_a[n] + unit_a[u][n] for n in global_a}, "A")
            alone = model(input_ids=ids[:1]).logits[0]
            assert torch.allclose(routed[u], alone, atol=1e-3)  # logits of size ~10
            assert not torch.allclose(routed[1 - u], alone, atol=1e-1)


def test_fedit_units_sharing_a_pass_learn_what_each_learns_alone(student) -> None:
    """Both factors' deltas of a unit, batched, equal distilling it alone with A trainable."""
    model, tokenizer = student
    sessions, guard = sessions_and_guard(2)
    lessons = [Lesson.from_session(s.id, [{"role": m.role, "content": m.content}
                                          for m in s.messages]) for s in sessions]
    cfg = DistillConfig(steps=2, dreams_per_lesson=2, optimizer="sgd", lr=0.5,
                        guard_every=1)
    start_b, start_a = random_b(model, 0.01, 7), lora.get_b(model, "A")

    def deltas(units):
        lora.set_b(model, start_b)
        lora.set_b(model, start_a, "A")
        lora.freeze_a(model, frozen=False)
        results = distill.consolidate_units(model, tokenizer, units, guard, cfg, progress=False)
        lora.freeze_a(model)
        return results

    alone = [deltas([[lesson]])[0] for lesson in lessons]
    together = deltas([[lesson] for lesson in lessons])
    for one, shared in zip(alone, together, strict=True):
        for mine, theirs in ((one.delta, shared.delta), (one.a_delta, shared.a_delta)):
            assert mine is not None and theirs is not None
            size = max(float(np.abs(mine[n]).max()) for n in mine)
            assert size > 1e-5  # each factor of each unit moved
            for name in mine:
                assert np.allclose(theirs[name], mine[name], atol=1e-3 * size), name
    assert not np.allclose(alone[0].a_delta[next(iter(alone[0].a_delta))],
                           alone[1].a_delta[next(iter(alone[1].a_delta))], atol=1e-6)


def test_sft_units_sharing_a_pass_learn_what_each_learns_alone(student) -> None:
    model, tokenizer = student
    sessions, _ = sessions_and_guard(3)
    lessons = [Lesson.from_session(s.id, [{"role": m.role, "content": m.content}
                                          for m in s.messages]) for s in sessions]
    units = [distill.transcript_examples(tokenizer, [lesson]) for lesson in lessons]
    cfg = DistillConfig(steps=3, lr=0.5, optimizer="sgd", method="sft_transcript",
                        prompts_per_step=2, samples_per_prompt=1)
    start_b = random_b(model, 0.01, 7)

    def run(chunk):
        lora.set_b(model, start_b)
        return distill.supervise_units(model, tokenizer, chunk, cfg)

    alone = [run([unit])[0] for unit in units]
    together = run(units)
    assert all(np.array_equal(lora.get_b(model)[n], start_b[n]) for n in start_b)  # B kept
    for one, shared in zip(alone, together, strict=True):
        assert shared.stats.loss == pytest.approx(one.stats.loss, rel=1e-4)
        assert shared.stats.tokens == one.stats.tokens
        size = max(float(np.abs(one.delta[n]).max()) for n in one.delta)
        assert size > 1e-4
        for name in one.delta:
            assert np.allclose(shared.delta[name], one.delta[name], atol=1e-4 * size), name
    assert not np.allclose(alone[0].delta[next(iter(alone[0].delta))],
                           alone[1].delta[next(iter(alone[1].delta))], atol=1e-4)


def test_units_per_pass_must_be_positive() -> None:
    with pytest.raises(ValueError, match="units_per_pass=0"):
        DistillConfig(units_per_pass=0)


def sessions_and_guard(count: int):
    world = W.make_world(W.WorldSpec(seed=3, sites=1))
    sessions = [Session.from_dict(s) for s in world.sites[0].sessions[:count]]
    return sessions, [W.task_prompt(t) for t in world.guard]


def test_a_units_delta_is_the_same_whichever_units_share_its_pass(student) -> None:
    model, tokenizer = student
    sessions, guard = sessions_and_guard(2)
    cfg = DistillConfig(steps=2, dreams_per_lesson=2, optimizer="sgd", lr=0.5,
                        guard_every=1)

    def session_deltas(units_per_pass: int) -> list[tuple[str, dict[str, np.ndarray]]]:
        lora.set_b(model, random_b(model, 0.01, 7))  # a global adapter that is not zero
        result = consolidate_sessions(
            model, tokenizer, sessions, dataclasses.replace(cfg, units_per_pass=units_per_pass),
            site="s", base_version=0, seed=0, guard=guard, per_session=True, progress=False)
        return list(result.session_updates)

    alone, together = session_deltas(1), session_deltas(2)
    assert [s for s, _ in together] == [s.id for s in sessions]
    for (_, one), (_, shared) in zip(alone, together, strict=True):
        size = max(float(np.abs(one[n]).max()) for n in one)
        assert size > 1e-4  # each unit learned something
        for name in one:
            assert np.allclose(shared[name], one[name], atol=1e-4 * size), name
    # Different sessions give different deltas: the comparison above could fail.
    assert not np.allclose(alone[0][1][next(iter(alone[0][1]))],
                           alone[1][1][next(iter(alone[1][1]))], atol=1e-4)


def test_replay_is_refused_when_units_share_a_pass(student) -> None:
    model, tokenizer = student
    sessions, guard = sessions_and_guard(2)
    lessons = [Lesson.from_session(s.id, [{"role": m.role, "content": m.content}
                                          for m in s.messages]) for s in sessions]
    dream = Dream(lessons[0].session_id, lessons[0].probes[0], 1.0)
    with pytest.raises(ValueError, match="replay with one unit"):
        distill.consolidate_units(model, tokenizer, [[lesson] for lesson in lessons], guard,
                                  DistillConfig(steps=1), replay=[(lessons[0], dream)],
                                  progress=False)


def test_a_common_start_is_read_under_each_units_own_delta(student) -> None:
    """Prompts of different units that start alike (a chat template's system turn): the start
    is read once per unit, under that unit's delta, so each prompt's logits, read for
    sampling or scored with completions, are those of its own pass under its own unit."""
    model, tokenizer = student
    lora.set_b(model, random_b(model, 0.05, 0))
    start = [3 + (5 * i) % 40 for i in range(SHARED_START_MIN + 2)]
    prompts = [[*start, 11, 12], [*start, 13], [*start, 14, 15, 16]]
    units, completions = [1, 0, 1], [[20, 21], [22], [23, 24, 25]]
    deltas = lora.UnitDeltas(model, 2)
    try:
        with torch.no_grad():
            for delta in deltas.parameters():
                delta.normal_(0, 0.2)
            read = read_prompts(model, prompts, tokenizer.pad_token_id, units)
            scored, counts = completion_logits(model, prompts, completions, 0,
                                               units=units)
            alone = []
            for prompt, y, unit in zip(prompts, completions, units, strict=True):
                with lora.routed(model, torch.tensor([[unit]])):
                    alone.append(model(input_ids=torch.tensor([prompt + y])).logits[0])
    finally:
        deltas.detach()
    assert common_start(prompts) == len(start)
    assert counts == [len(y) for y in completions]
    rows = torch.split(scored, counts)
    for prompt, own, last, row in zip(prompts, alone, read.logits, rows, strict=True):
        assert torch.allclose(last[-1], own[len(prompt) - 1], atol=1e-4)
        assert torch.allclose(row, own[len(prompt) - 1:-1], atol=1e-4)
