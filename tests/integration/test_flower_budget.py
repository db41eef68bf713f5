"""The Flower path with the fleet's privacy guards: the ServerApp runs the fleet's aggregate
check on the unmasked cohort sum (a forged sum is not merged, and the refusal is recorded
with the check's name and numbers), and refuses a round its `epsilon-budget` cannot pay
(nothing is sent; result.json records the refusal and epsilon per unit). The real ClientApp
answers every phase, with its training replaced by a known delta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

import safetensors.numpy
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fleetmind.aggregation.accountant import Budget, RoundCharge, epsilon_of, worst_case_charge
from fleetmind.aggregation.dp import DPConfig
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.flower import client_app as flower_client
from fleetmind.flower.secure import SecureLoRAMerge
from fleetmind.flower.server_app import make_strategy, run_fleet
from fleetmind.flower.settings import FlowerRun
from fleetmind.flower.strategy import b_record, b_tensors

RING = 1 << 32


class LoopGrid:
    """Each message goes to the ClientApp with its node's Context (kept across messages,
    as a SuperNode keeps it); `sent` counts the messages of each server round."""

    def __init__(self, app, contexts: dict[int, Context]) -> None:
        self.app, self.contexts = app, contexts
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        self.sent += messages
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: FlowerRun,
          shapes: dict[str, tuple[int, ...]], forge=None) -> tuple[LoopGrid, dict]:
    """Four nodes, each contributing a small random delta of `shapes` every round; `forge`
    rewrites the ring words of the last node (a malicious site: its masks still cancel, so
    what it adds reaches the unmasked sum)."""
    rng = np.random.default_rng(5)
    deltas = {node: {name: rng.normal(0, 0.01, shape).astype(np.float32)
                     for name, shape in shapes.items()} for node in (11, 12, 13, 14)}

    def contribution(sent, run, site, server_round):
        return flower_client.SiteContribution(deltas[int(site.name)], 3, 10, 1)

    real_encode = flower_client.encode

    def encode(delta, encoding, rng=None):
        ring = real_encode(delta, encoding, rng)
        if forge is not None and delta is deltas[14]:
            ring = (forge(ring.astype(np.int64), encoding) % RING).astype(np.uint32)
        return ring

    monkeypatch.setattr(flower_client, "site_contribution", contribution)
    monkeypatch.setattr(flower_client, "encode", encode)
    contexts = {node: Context(run_id=1, node_id=node, node_config={
        "site": str(node), "sessions": str(tmp_path / "s.jsonl"),
        "state": str(tmp_path / str(node))}, state=RecordDict(), run_config={})
        for node in deltas}
    return LoopGrid(flower_client.client_app(run.as_config()), contexts), deltas


def forged_weight(ring: np.ndarray, encoding) -> np.ndarray:
    """A weight word cancelling the three honest weights: the mean S/W explodes."""
    from fleetmind.protos import secagg_codec as codec

    _, weight_code = codec.payload_codes(encoding)
    ring[-1] = round((-3.0 + 1e-6) * weight_code.scale)
    return ring


def inflated(ring: np.ndarray, encoding) -> np.ndarray:
    """Delta words 10,000 times what the site's clip allows."""
    words = np.where(ring[:-1] >= RING // 2, ring[:-1] - RING, ring[:-1])
    ring[:-1] = words * 10_000
    return ring


SHAPES = {"layer.0": (8, 16), "layer.1": (4, 16)}


@pytest.mark.parametrize(("forge", "check"), [(None, None), (forged_weight, "weight_sum"),
                                              (inflated, "norm")],
                         ids=["honest", "forged-weight-word", "inflated-delta"])
def test_a_forged_cohort_sum_is_not_merged_and_the_check_is_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None, forge, check
        ) -> None:
    run = FlowerRun(sites=4, dp_clip_norm=0.5, dp_noise_multiplier=1.0)
    grid, _ = fleet(tmp_path, monkeypatch, run, SHAPES, forge)
    strategy = make_strategy(run)
    assert isinstance(strategy, SecureLoRAMerge)
    sent = {name: np.full(shape, 0.5, np.float32) for name, shape in SHAPES.items()}
    messages = strategy.configure_train(1, b_record(sent), ConfigRecord(), grid)
    merged, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    outcome = strategy.outcomes[1]
    # The sum was seen either way, so its charge is spent (the z all four carried).
    assert [c.noise_multiplier for c in strategy.charges] == [pytest.approx(1.0)]
    if check is None:
        assert merged is not None and outcome == {"contributors": 4, "dropped": 0}
        moved = max(np.abs(b_tensors(merged)[n] - sent[n]).max() for n in sent)
        assert 0 < moved < 1
        return
    assert merged is None and metrics is None  # not merged: Flower keeps the B it sent
    assert outcome["aborted"] == "merge" and outcome["rejected"] == check
    assert (outcome["contributors"], outcome["dropped"]) == (4, 0)
    low, high = outcome["allowed"]
    measured = outcome["measured"]
    assert measured is not None and not low <= measured <= high
    assert "weight word was forged" in outcome["reason"] if check == "weight_sum" else \
        "the cohort's clip and noise allow" in outcome["reason"]
    json.dumps(outcome)  # result.json's secure_rounds holds it as it is


@pytest.mark.parametrize(("cap", "budget", "refused_round"), [(0, 3.0, 2), (3, 4.0, 1)],
                         ids=["no-cap-second-round", "cap-3-first-round"])
def test_a_round_the_budget_cannot_pay_is_refused_and_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None,
        toy_model_dir: Path, cap: int, budget: float, refused_round: int) -> None:
    from fleetmind.client import lora
    from fleetmind.flower.server_app import adapted_model

    run = FlowerRun(model=str(toy_model_dir), out=str(tmp_path / "out"), sites=4, rounds=2,
                    dp_clip_norm=0.5, dp_noise_multiplier=2.0, participation_cap=cap,
                    epsilon_budget=budget)
    shapes = {name: b.shape for name, b in lora.get_b(adapted_model(run)[0]).items()}
    grid, _ = fleet(tmp_path, monkeypatch, run, shapes)
    summary = run_fleet(grid, run)

    # The fleet's rule: charged before it runs as if only the minimum cohort (3 of 4) added
    # noise, and refused if units entering rounds like it would pass the budget.
    worst = worst_case_charge(DPConfig(0.5, 2.0, "session", "distributed", 4), 3)
    assert worst.noise_multiplier == pytest.approx(2.0 * np.sqrt(3 / 4))
    spent = [RoundCharge(2.0)] * (refused_round - 1)  # published rounds: all four carried z
    assert Budget(budget, run.dp_delta, charges=list(spent),
                  cap=ParticipationCap(cap) if cap else None).refusal(worst) is not None

    result = json.loads((Path(run.out) / "result.json").read_text())
    assert result == json.loads(json.dumps(summary))
    rounds = result["secure_rounds"]
    for published in range(1, refused_round):
        assert rounds[str(published)] == {"contributors": 4, "dropped": 0}
    for refused in range(refused_round, 3):
        outcome = rounds[str(refused)]
        assert outcome["refused"] == "privacy_budget"
        assert outcome["reason"].startswith("privacy budget exhausted: ")
        assert outcome["epsilon_budget"] == budget
    # Nothing of a refused round was sent: the train message and four phases per node, for
    # the published rounds only.
    assert len(grid.sent) == 5 * 4 * (refused_round - 1)
    privacy = result["privacy"]
    assert (privacy["epsilon_budget"], privacy["rounds_charged"]) == (budget,
                                                                      refused_round - 1)
    expected = epsilon_of(spent, run.dp_delta) if spent else 0.0
    assert privacy["epsilon_per_unit"] == pytest.approx(expected)
    assert privacy["epsilon_per_unit"] <= budget
    final = safetensors.numpy.load_file(str(Path(run.out) / "global_b.safetensors"))
    assert any(np.abs(b).max() > 0 for b in final.values()) == (refused_round > 1)
