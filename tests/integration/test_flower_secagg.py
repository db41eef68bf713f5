"""Secure aggregation and the privacy unit on the Flower path: the ServerApp's strategy
drives fleetmind's SecAgg+ states over a Grid to the real ClientApp (one Context per node,
as a SuperNode keeps it), and merges what the plaintext merge would, within the ring
code's rounding; every message the ServerApp receives is recorded, and none holds a
site's update; a site lost mid-round leaves the others' sum published; the ClientApp clips
each privacy unit with the site agent's own function and keeps the participation cap."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr")

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict
from support.flower_rounds import quantisation_bound

from fleetmind.aggregation import accountant, merge
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.aggregation.update import Update, UpdateMetadata
from fleetmind.client.contribution import site_update
from fleetmind.client.scrub import ScrubReport
from fleetmind.client.site_config import SiteConfig
from fleetmind.flower import client_app as flower_client
from fleetmind.flower import secagg_messages as carried
from fleetmind.flower.secure import SecureLoRAMerge
from fleetmind.flower.server_app import make_strategy, privacy_spent
from fleetmind.flower.settings import FlowerRun, SiteNode
from fleetmind.flower.strategy import b_record, b_tensors

SHAPES = {"layer.0": (8, 16), "layer.1": (4, 16)}


class RecordingGrid:
    """A Grid that hands each message to the ClientApp with that node's Context (kept
    across messages, as a SuperNode keeps it for a run) and records every reply the
    ServerApp receives. `lose` maps a ClientApp action to nodes whose reply is lost there,
    as if the node had vanished; `forge` maps an action to (node, other): node's answer
    there is replaced by other's, as if it spoke in another site's name. Every phase
    message is then delivered a second time, and the answers kept in `repeated`."""

    def __init__(self, app, contexts: dict[int, Context],
                 lose: dict[str, set[int]] | None = None,
                 forge: dict[str, tuple[int, int]] | None = None) -> None:
        self.app, self.contexts, self.lose = app, contexts, lose or {}
        self.forge = forge or {}
        self.received: list[RecordDict] = []
        self.repeated: dict[str, list[Message]] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            action = message.metadata.message_type.partition(".")[2] or "train"
            if node in self.lose.get(action, set()):
                continue
            replies.append(self.app(message, self.contexts[node]))
            if action != "train":
                self.repeated.setdefault(action, []).append(
                    self.app(message, self.contexts[node]))
        if action in self.forge:
            by_node = {reply.metadata.src_node_id: reply for reply in replies}
            node, other = self.forge[action]
            by_node[node].content = by_node[other].content
        self.received += [reply.content for reply in replies if not reply.has_error()]
        return replies


def nodes_and_deltas(count: int, seed: int = 0, shapes: dict[str, tuple[int, int]] = SHAPES
                     ) -> dict[int, dict[str, np.ndarray]]:
    # Flower's node ids are large random integers: the strategy must renumber them.
    rng = np.random.default_rng(seed)
    return {int(node): {name: rng.normal(0, 0.05, shape).astype(np.float32)
                        for name, shape in shapes.items()}
            for node in rng.integers(2**40, 2**62, count)}


def secure_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: FlowerRun,
                 deltas: dict[int, dict[str, np.ndarray]],
                 lose: dict[str, set[int]] | None = None,
                 forge: dict[str, tuple[int, int]] | None = None):
    """One Flower round of `run` (secure aggregation on) over a RecordingGrid; each node's
    training replaced by its delta in `deltas`. Returns the strategy, the merged B (None
    if nothing was published), the grid and each node's ring words."""
    rings: dict[int, np.ndarray] = {}
    node_of_site = {f"site-{node}": node for node in deltas}

    def contribution(sent, run, site: SiteNode, server_round):
        return flower_client.SiteContribution(deltas[node_of_site[site.name]], 3, 10, 3)

    def encode(delta, encoding, rng=None):
        ring = real_encode(delta, encoding, rng)
        node = next(n for n, d in deltas.items() if d is delta)
        rings[node] = ring
        return ring

    real_encode = flower_client.encode
    monkeypatch.setattr(flower_client, "site_contribution", contribution)
    monkeypatch.setattr(flower_client, "encode", encode)
    contexts = {node: Context(run_id=1, node_id=node, node_config={
        "site": f"site-{node}", "sessions": str(tmp_path / "s.jsonl"),
        "state": str(tmp_path / str(node))}, state=RecordDict(), run_config={})
        for node in deltas}
    grid = RecordingGrid(flower_client.client_app(run.as_config()), contexts, lose, forge)
    strategy = make_strategy(run)
    assert isinstance(strategy, SecureLoRAMerge)
    shapes = {name: b.shape for name, b in next(iter(deltas.values())).items()}
    sent = {name: np.full(shape, 0.5, np.float32) for name, shape in shapes.items()}
    messages = strategy.configure_train(1, b_record(sent), ConfigRecord(), grid)
    merged, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    return strategy, sent, None if merged is None else b_tensors(merged), grid, rings


def plaintext_merge(run: FlowerRun, sent, deltas) -> dict[str, np.ndarray]:
    updates = [Update(delta, UpdateMetadata(site="s", base_version=0)) for delta in deltas]
    return merge.exact_merge(sent, *merge.weighted_delta_sum(updates),
                             merge.FedAvg(run.server_learning_rate))[0]


def test_secure_round_merges_the_plaintext_merge_and_the_server_holds_no_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None) -> None:
    run = FlowerRun(sites=4, server_learning_rate=2.0)
    deltas = nodes_and_deltas(4)
    strategy, sent, merged, grid, rings = secure_round(tmp_path, monkeypatch, run, deltas)
    assert merged is not None and strategy.outcomes[1] == {"contributors": 4, "dropped": 0}
    expected = plaintext_merge(run, sent, deltas.values())
    bound = quantisation_bound(run, 4)
    for name in expected:
        assert np.abs(merged[name] - expected[name]).max() <= bound
    assert any(np.abs(merged[n] - sent[n]).max() > 100 * bound for n in sent)  # it moved

    # Everything the ServerApp received: the train replies, then the four phases' answers.
    assert len(grid.received) == 5 * 4
    individual = [merge.flatten(d, SHAPES) for d in deltas.values()]
    individual += [t.reshape(-1) for d in deltas.values() for t in d.values()]
    masked = []
    for content in grid.received:
        assert "arrays" not in content  # no B reply: the clear path's
        for record in content.array_records.values():
            for name in record:
                array = record[name].numpy()
                masked.append(array)
                for vector in [*individual, *rings.values()]:
                    assert not (array.shape == vector.shape and np.array_equal(array, vector))
        for record in content.config_records.values():
            for value in record.values():
                for vector in individual:
                    assert not (isinstance(value, bytes) and vector.tobytes()[:64] in value)
    # One masked vector per site, none close to its ring words: masks cover every word.
    assert len(masked) == 4
    for array in masked:
        assert all(np.mean(array == ring) < 0.01 for ring in rings.values())
    # A phase asked again is refused: no second keys, shares or masked vector (the same
    # masks on a second input would reveal the difference), no second unmasking.
    assert set(grid.repeated) == {carried.ADVERTISE_KEYS, carried.SHARE_KEYS,
                                  carried.MASKED_INPUT, carried.UNMASKING}
    for answers in grid.repeated.values():
        assert len(answers) == 4 and all(answer.has_error() for answer in answers)


@pytest.mark.parametrize("phase", [carried.SHARE_KEYS, carried.MASKED_INPUT, carried.UNMASKING])
def test_a_site_lost_mid_round_leaves_the_others_sum_published(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None, phase: str
        ) -> None:
    run = FlowerRun(sites=4, server_learning_rate=1.0)
    deltas = nodes_and_deltas(4, seed=1)
    lost = sorted(deltas)[2]
    strategy, sent, merged, _, _ = secure_round(tmp_path, monkeypatch, run, deltas,
                                                {phase: {lost}})
    assert merged is not None
    # Lost before its masked vector: the sum is the other three's (its pairwise masks are
    # rebuilt from its neighbours' shares); lost after it (unmasking): all four are in.
    kept = [d for node, d in deltas.items()
            if node != lost or phase == carried.UNMASKING]
    assert strategy.outcomes[1] == {"contributors": len(kept), "dropped": 4 - len(kept)}
    expected = plaintext_merge(run, sent, kept)
    bound = quantisation_bound(run, len(kept))
    for name in expected:
        assert np.abs(merged[name] - expected[name]).max() <= bound


def test_a_node_answering_in_another_sites_name_is_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None) -> None:
    run = FlowerRun(sites=4)
    deltas = nodes_and_deltas(4, seed=4)
    liar, other = sorted(deltas)[:2]
    strategy, sent, merged, _, _ = secure_round(tmp_path, monkeypatch, run, deltas,
                                                forge={carried.ADVERTISE_KEYS: (liar, other)})
    assert merged is not None
    assert strategy.outcomes[1] == {"contributors": 3, "dropped": 1}
    kept = [d for node, d in deltas.items() if node != liar]
    expected = plaintext_merge(run, sent, kept)
    for name in expected:
        assert np.abs(merged[name] - expected[name]).max() <= quantisation_bound(run, 3)


def test_too_many_losses_publish_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         task_identity: None) -> None:
    run = FlowerRun(sites=4)
    deltas = nodes_and_deltas(4, seed=2)
    lost = set(sorted(deltas)[:2])  # two of four: below the minimum cohort of three
    strategy, _, merged, _, _ = secure_round(tmp_path, monkeypatch, run, deltas,
                                             {carried.MASKED_INPUT: lost})
    assert merged is None
    assert strategy.outcomes[1]["aborted"] == "masked_input_collection"
    assert strategy.charges == []  # nothing was released, nothing is charged


def test_distributed_noise_is_split_among_the_sites_and_charged_as_carried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None) -> None:
    run = FlowerRun(sites=4, dp_clip_norm=0.5, dp_noise_multiplier=2.0, participation_cap=3)
    # 12,288 noise draws: their std is within 0.6 % of the true one (one sigma), so 4 %
    # never fails by chance yet tells three sites' noise from four's (15 % apart).
    deltas = nodes_and_deltas(4, seed=3, shapes={"layer.0": (64, 128), "layer.1": (32, 128)})
    lost = sorted(deltas)[0]
    strategy, sent, merged, _, _ = secure_round(tmp_path, monkeypatch, run, deltas,
                                                {carried.MASKED_INPUT: {lost}})
    assert merged is not None
    kept = [d for node, d in deltas.items() if node != lost]
    noise = np.concatenate([(merged[n] - plaintext_merge(run, sent, kept)[n]).reshape(-1)
                            for n in sorted(merged)]) * len(kept) / run.server_learning_rate
    # Each site added discrete Gaussian noise of z*C/sqrt(4) in the ring; three did.
    carried_z = run.dp_noise_multiplier * math.sqrt(3 / 4)
    assert np.std(noise) == pytest.approx(carried_z * run.dp_clip_norm, rel=0.04)
    assert [c.noise_multiplier for c in strategy.charges] == [pytest.approx(carried_z)]
    # result.json's privacy record: epsilon per unit under the cap, fleetmind's accountant.
    spent = privacy_spent(run, strategy.charges)
    assert spent["epsilon_per_unit"] == accountant.epsilon_per_unit(
        strategy.charges, ParticipationCap(3), run.dp_delta)
    assert (spent["privacy_unit"], spent["max_rounds"], spent["noise"]) == (
        "session", 3, "distributed")
    assert privacy_spent(run, strategy.charges * 5)["epsilon_per_unit"] == pytest.approx(
        accountant.epsilon_per_unit(strategy.charges * 3, ParticipationCap(3), run.dp_delta))


# ---- the privacy unit: the site agent's clipping, on the Flower path ------------------


def sessions_file(path: Path, sessions: list[tuple[str, str | None]]) -> None:
    with path.open("a") as file:
        for sid, user in sessions:
            file.write(json.dumps({"id": sid, **({"user": user} if user else {}), "messages": [
                {"role": "user", "content": f"hello from {sid}"},
                {"role": "assistant", "content": "hi"}]}) + "\n")


def fake_consolidation(monkeypatch: pytest.MonkeyPatch, shapes: dict[str, tuple[int, ...]]
                       ) -> list:
    """consolidate_sessions replaced by per-session deltas of known, different norms (the
    clipping is under test, not the distillation); returns the results it made."""
    made = []

    def consolidate_sessions(model, tokenizer, sessions, cfg, *, site, base_version, seed,
                             per_session=False, **_):
        updates = tuple((s.id, {name: np.full(shape, 0.1 * (i + 1) ** 2, np.float32)
                                for name, shape in shapes.items()})
                        for i, s in enumerate(sorted(sessions, key=lambda s: s.id)))
        total = {name: sum(d[name] for _, d in updates) / len(updates) for name in shapes}
        result = SimpleNamespace(
            update=Update(total, UpdateMetadata(site=site, base_version=base_version,
                                                sessions=len(sessions), seed=seed)),
            session_updates=updates if per_session else (), scrubbed=ScrubReport(),
            stats=SimpleNamespace(tokens=5), consolidation_id=f"c{len(made)}")
        made.append((result, list(sessions)))
        return result

    monkeypatch.setattr("fleetmind.client.consolidate.consolidate_sessions",
                        consolidate_sessions)
    return made


@pytest.mark.parametrize("unit", ["session", "user", "site"])
def test_the_clientapp_clips_each_unit_as_the_site_agent_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_model_dir: Path, unit: str
        ) -> None:
    from fleetmind.client import lora
    from fleetmind.flower.server_app import adapted_model

    run = FlowerRun(model=str(toy_model_dir), world=str(tmp_path / "no-world"), sites=3,
                    privacy_unit=unit, dp_clip_norm=0.5)
    shapes = {name: b.shape for name, b in lora.get_b(adapted_model(run)[0]).items()}
    made = fake_consolidation(monkeypatch, shapes)
    sessions_file(tmp_path / "s.jsonl", [("a1", "alice"), ("a2", "alice"), ("b1", None)])
    site = SiteNode("north", tmp_path / "s.jsonl", tmp_path / "north")
    sent = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    got = flower_client.site_contribution(sent, run, site, server_round=1)
    assert isinstance(got, flower_client.SiteContribution)

    result, sessions = made[0]
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    agent = site_update(SiteConfig("north", tmp_path / "agent", toy_model_dir,
                                   "127.0.0.1:7443", tmp_path / "id.key", key, insecure=True,
                                   clip_norm=0.5, privacy_unit=unit),
                        result, sessions, base_version=0, latest_version=0)
    assert got.units == agent.contributing_units == {"session": 3, "user": 2, "site": 1}[unit]
    for name in shapes:
        np.testing.assert_array_equal(got.delta[name], agent.delta[name])
    total = float(np.linalg.norm(merge.flatten(got.delta, shapes).astype(np.float64)))
    assert total <= 0.5 * got.units * (1 + 1e-6)  # float32 rounding of each coordinate
    # What the site keeps as its round's update is the clipped delta that left.
    kept = Update.from_bytes((site.state / "round-0001-update.safetensors").read_bytes())
    for name in shapes:
        np.testing.assert_array_equal(kept.tensors[name], agent.delta[name])


def test_a_unit_at_the_participation_cap_is_left_out_before_distilling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_model_dir: Path) -> None:
    run = FlowerRun(model=str(toy_model_dir), world=str(tmp_path / "no-world"), sites=3,
                    privacy_unit="user", dp_clip_norm=1.0, participation_cap=1)
    from fleetmind.client import lora
    from fleetmind.flower.server_app import adapted_model

    shapes = {name: b.shape for name, b in lora.get_b(adapted_model(run)[0]).items()}
    made = fake_consolidation(monkeypatch, shapes)
    site = SiteNode("north", tmp_path / "s.jsonl", tmp_path / "north")
    sent = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    sessions_file(site.sessions, [("a1", "alice"), ("b1", "bob")])
    assert isinstance(flower_client.site_contribution(sent, run, site, 1),
                      flower_client.SiteContribution)
    # Alice returns; with a cap of one round per user only Carol's session is distilled.
    sessions_file(site.sessions, [("a2", "alice"), ("c1", "carol")])
    assert isinstance(flower_client.site_contribution(sent, run, site, 2),
                      flower_client.SiteContribution)
    assert [s.id for s in made[1][1]] == ["c1"]
    records = flower_client.read_participation(site.state)
    assert [dict(r.counts) for r in records] == [{"alice": 1, "bob": 1}, {"carol": 1}]
    # Nothing new under the cap: a reason, not a delta.
    sessions_file(site.sessions, [("a3", "alice")])
    reason = flower_client.site_contribution(sent, run, site, 3)
    assert isinstance(reason, str) and "participation cap" in reason
