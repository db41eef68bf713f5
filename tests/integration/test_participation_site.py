"""Participation caps at the site (issue 17, item 4): a privacy unit at its cap is left out
before anything is distilled or sent, the outbox records each entering unit's count under
its signature, the counts are rebuilt from the outbox after a restart, and the audit
reports show the counts and the ledger's cap. Sites run `run_once` over real loopback gRPC
against a real aggregator; only the distillation is replaced by a cheap stand-in (the
round and the cap are under test, not the learning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import each_returned, run_once_each
from support.toy_fleet import FAST, TOY_SPEC

from fleetmind.aggregation.participation import (
    CapReachedError,
    ParticipationRecord,
    participation_history,
)
from fleetmind.aggregation.records import OutboxRecord, RoundRecord, payload_sha256, verify_outbox
from fleetmind.audit.ledger_report import ledger_report
from fleetmind.audit.outbox_report import outbox_report
from fleetmind.client import site as site_module
from fleetmind.client.agent import SiteUpdate
from fleetmind.client.contribution import (
    Participation,
    RoundCapError,
    active_adapter,
    stricter_cap,
    unit_of,
    within_cap,
)
from fleetmind.client.identity import load_identity_key
from fleetmind.client.outbox import Outbox
from fleetmind.client.scrub import ScrubReport
from fleetmind.client.site import Outcome, run_once
from fleetmind.client.site_config import ConfigError, SiteConfig
from fleetmind.client.store import Message, Session, SessionStore
from fleetmind.protos.fleetmind.v1 import fleet_pb2
from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
from fleetmind.server.ledger import Ledger

CAP = 2
ANY_KEY = Ed25519PrivateKey.generate().public_key().public_bytes_raw()


@pytest.fixture
def aggregator_config(tmp_path: Path, request) -> ServerConfig:
    """The config the shared `aggregator` fixture serves."""
    # Parametrized with K: the fleet's cap, sent in each round's config (default none).
    cap = getattr(request, "param", None)
    return ServerConfig(
        data_dir=tmp_path / "aggregator", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=60, phase_deadline_s=30),
        privacy=PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=100.0,
                              privacy_unit="user", participation_cap=cap),
        adapter=TOY_SPEC)


def site_config(tmp_path: Path, name: str, model: Path, address: str, key: bytes,
                **changes) -> SiteConfig:
    values = dict(name=name, data_dir=tmp_path / name, model_dir=model, aggregator=address,
                  identity_key=tmp_path / name / "identity.pem", aggregator_key=key,
                  min_new_sessions=1, distill=FAST, insecure=True, round_timeout_s=30.0,
                  privacy_unit="user")
    values.update(changes)
    return SiteConfig(**values)


def session(sid: str, user: str | None) -> Session:
    return Session(sid, (Message("user", f"note {sid}: remember this"),), user=user)


def add(config: SiteConfig, *sessions: Session) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with SessionStore(config.data_dir) as store:
        for s in sessions:
            assert store.add(s)


@pytest.fixture
def distilled(monkeypatch) -> dict[str, list[list[str]]]:
    """Replaces the distillation with a zero delta of the version's shapes, clipped as the
    real one says, and records which sessions each site distilled."""
    calls: dict[str, list[list[str]]] = {}

    def consolidate(config, sessions, base_version, earlier):
        calls.setdefault(config.name, []).append(sorted(s.id for s in sessions))
        _, _, b = active_adapter(config)
        units = {unit_of(config, s) for s in sessions}
        update = SiteUpdate(delta={n: np.zeros_like(t) for n, t in b.items()},
                            base_version=base_version,
                            session_ids=tuple(sorted(s.id for s in sessions)),
                            contributing_units=len(units), clip_norm=config.clip_norm,
                            privacy_unit=config.privacy_unit)
        result = SimpleNamespace(consolidation_id=f"{config.name}-{len(calls[config.name])}",
                                 stats=SimpleNamespace(tokens=0))
        return result, update

    monkeypatch.setattr(site_module, "consolidate", consolidate)
    return calls


def one_round(address: str, *configs: SiteConfig) -> list[Outcome]:
    return each_returned(run_once_each(address, list(configs), join_s=120), Outcome,
                         [c.name for c in configs])


def outbox_of(config: SiteConfig) -> tuple[list, Ed25519PrivateKey]:
    identity = load_identity_key(config.identity_key, create=False)
    with Outbox(config.data_dir / "outbox.sqlite", identity) as outbox:
        return list(outbox), identity


def test_a_unit_at_its_cap_is_left_out_before_anything_is_sent_and_stays_out(
        aggregator, tmp_path, toy_model_dir, distilled) -> None:
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    a = site_config(tmp_path, "site-a", toy_model_dir, aggregator.address, key,
                    participation_cap=CAP)
    # Two sites without a cap of their own complete the cohort.
    b, c = (site_config(tmp_path, name, toy_model_dir, aggregator.address, key)
            for name in ("site-b", "site-c"))

    # Round 1: alice (two sessions) and bob; round 2: alice again and carol.
    add(a, session("a1", "alice"), session("a2", "alice"), session("a3", "bob"))
    add(b, session("b1", "erin"))
    add(c, session("c1", "fay"))
    first, *_ = one_round(aggregator.address, a, b, c)
    add(a, session("a4", "alice"), session("a5", "carol"))
    add(b, session("b2", "erin"))
    add(c, session("c2", "fay"))
    second, *_ = one_round(aggregator.address, a, b, c)
    assert distilled["site-a"] == [["a1", "a2", "a3"], ["a4", "a5"]]

    # Round 3: alice has entered CAP rounds. Her session is held back before distilling;
    # dan's enters alone.
    add(a, session("a6", "alice"), session("a7", "dan"))
    add(b, session("b3", "erin"))
    add(c, session("c3", "fay"))
    third, *_ = one_round(aggregator.address, a, b, c)
    assert distilled["site-a"][-1] == ["a7"]
    assert third.pending == 1 and third.round is not None
    rounds = [o.round.round_id for o in (first, second, third)]

    entries, identity = outbox_of(a)
    assert verify_outbox(entries, identity.public_key()) == entries[-1].hash
    records = [e.record for e in entries]
    assert [r.round_id for r in records] == rounds
    # Nothing of alice's third session was sent: no record names it, and the aggregator
    # summed exactly the payloads the outbox recorded.
    assert all("a6" not in r.session_ids for r in records)
    assert records[-1].session_ids == ("a7",)
    assert [r.participation_record for r in records] == [
        ParticipationRecord(rounds[0], "user", CAP, (("alice", 1), ("bob", 1))),
        ParticipationRecord(rounds[1], "user", CAP, (("alice", 2), ("carol", 1))),
        ParticipationRecord(rounds[2], "user", CAP, (("dan", 1),))]
    receipts = {h for e in aggregator.coordinator.ledger for h in e.record.payload_sha256s}
    assert {r.payload_sha256 for r in records} <= receipts

    # The site without a cap records no participation, and its outbox verifies as before.
    b_entries, b_identity = outbox_of(b)
    assert verify_outbox(b_entries, b_identity.public_key()) == b_entries[-1].hash
    assert all(e.record.participation is None for e in b_entries)
    assert b"participation" not in b_entries[0].body

    # A restart: a new config object, a new channel; the counts come back from the outbox.
    # alice's held session alone does not reach min_new_sessions: no round is joined,
    # nothing is distilled, nothing is recorded; it is held, not consumed.
    restarted = dataclasses.replace(a)
    with Outbox(a.data_dir / "outbox.sqlite", identity) as outbox:
        history = participation_history(outbox.participation_records())
    assert {unit: len(r) for unit, r in history.items()} == {"alice": CAP, "bob": 1,
                                                             "carol": 1, "dan": 1}
    channel = grpc.insecure_channel(aggregator.address)
    try:
        again = run_once(restarted, channel)
    finally:
        channel.close()
    assert again == Outcome(activated=(), pending=0)
    assert len(distilled["site-a"]) == 3
    assert len(outbox_of(a)[0]) == len(entries)
    with SessionStore(a.data_dir) as store:
        assert [s.id for s in store.unconsumed()] == ["a6"]

    # audit outbox: each upload's counts, and each unit's total.
    report = outbox_report(a.data_dir / "outbox.sqlite", entries,
                           identity.public_key().public_bytes_raw())
    assert report.ok
    assert report.participation == {"alice": CAP, "bob": 1, "carol": 1, "dan": 1}
    doc = report.as_json()
    assert doc["participation_counts"]["alice"] == CAP
    assert [row["participation"] for row in doc["records"]] == [
        {"alice": 1, "bob": 1}, {"alice": 2, "carol": 1}, {"dan": 1}]
    assert {row["participation_cap"] for row in doc["records"]} == {CAP}


@pytest.mark.parametrize("aggregator_config", [1], indirect=True, ids=["fleet-cap-1"])
def test_the_fleets_cap_from_the_round_config_is_enforced_and_recorded(
        aggregator, tmp_path, toy_model_dir, distilled) -> None:
    """No cap at the site: the round's config carries the fleet's (K = 1), the outbox
    records it, and the next iteration leaves out the units at it before distilling."""
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    a, b, c = (site_config(tmp_path, name, toy_model_dir, aggregator.address, key)
               for name in ("site-a", "site-b", "site-c"))
    add(a, session("a1", "alice"))
    add(b, session("b1", "erin"))
    add(c, session("c1", "fay"))
    first, *_ = one_round(aggregator.address, a, b, c)
    assert first.round is not None and first.round.round_config.participation_cap == 1
    add(a, session("a2", "alice"), session("a3", "carol"))
    add(b, session("b2", "gus"))
    add(c, session("c2", "hal"))
    second, *_ = one_round(aggregator.address, a, b, c)
    assert distilled["site-a"] == [["a1"], ["a3"]]
    entries, identity = outbox_of(a)
    assert verify_outbox(entries, identity.public_key()) == entries[-1].hash
    assert [e.record.participation_record for e in entries] == [
        ParticipationRecord(first.round.round_id, "user", 1, (("alice", 1),)),
        ParticipationRecord(second.round.round_id, "user", 1, (("carol", 1),))]


def test_a_stricter_cap_in_the_round_is_learned_and_the_update_computed_again(
        aggregator, tmp_path, toy_model_dir, distilled, monkeypatch) -> None:
    """The site filtered with the cap its outbox last recorded (3); the round says 1. The
    agent's last guard refuses before anything is written or sent, and the site leaves
    alice out and consolidates again, within the same iteration."""
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    a = site_config(tmp_path, "site-a", toy_model_dir, aggregator.address, key)
    add(a, session("a1", "alice"))
    identity = load_identity_key(a.identity_key)
    with Outbox(a.data_dir / "outbox.sqlite", identity) as outbox:
        outbox.append(OutboxRecord(
            round_id=1, payload_sha256=payload_sha256(b"r1"), norm_before_clip=0.0,
            norm_after_clip=0.0, noise_mode="none", noise_multiplier=0.0,
            session_ids=("a1",), scrubbed=ScrubReport(), base_version=0,
            privacy_unit="user",
            participation=ParticipationRecord(1, "user", 3, (("alice", 1),))))
    with SessionStore(a.data_dir) as store:
        store.record_consolidation("round-1", ["a1"])
    add(a, session("a2", "alice"), session("a3", "carol"))
    sent: list[tuple[str, ...]] = []

    def participate(channel, key, name, update, outbox, *, participation, **_):
        wire = fleet_pb2.RoundConfig(round_id=2, participation_cap=1)
        entry = outbox.append(OutboxRecord(
            round_id=2, payload_sha256=payload_sha256(b"r2"), norm_before_clip=0.0,
            norm_after_clip=0.0, noise_mode="none", noise_multiplier=0.0,
            session_ids=update.session_ids, scrubbed=update.scrubbed, base_version=0,
            privacy_unit=update.privacy_unit, participation=participation(2, wire)))
        sent.append(update.session_ids)
        return SimpleNamespace(round_id=2, version=0, cohort_size=3, outbox_entry=entry)

    monkeypatch.setattr(site_module, "participate", participate)
    channel = grpc.insecure_channel(aggregator.address)
    try:
        outcome = run_once(a, channel)
    finally:
        channel.close()
    assert distilled["site-a"] == [["a2", "a3"], ["a3"]]  # the first update never left
    assert sent == [("a3",)] and outcome.pending == 1
    entries, _ = outbox_of(a)
    assert [e.record.participation_record for e in entries][1:] == [
        ParticipationRecord(2, "user", 1, (("carol", 1),))]
    with SessionStore(a.data_dir) as store:
        assert [s.id for s in store.unconsumed()] == ["a2"]


def test_the_last_guard_refuses_a_unit_at_the_stricter_cap() -> None:
    history = {"alice": (1, 2), "bob": (2,)}
    plan = Participation("user", ("alice", "bob"), history, site_cap=3)
    assert plan(3, fleet_pb2.RoundConfig()) == {
        "round_id": 3, "privacy_unit": "user", "max_rounds": 3,
        "counts": {"alice": 3, "bob": 2}}
    # The round's cap is stricter than the site's: alice is at it, the record is refused
    # (the agent builds the outbox record, and sends the payload, only after this).
    with pytest.raises(RoundCapError, match="alice") as caught:
        plan(3, fleet_pb2.RoundConfig(participation_cap=2))
    assert isinstance(caught.value, CapReachedError) and caught.value.round_cap == 2
    # The same round sent again counts once; no cap at all records nothing.
    assert plan(2, fleet_pb2.RoundConfig(participation_cap=2))["counts"] == {"alice": 2,
                                                                            "bob": 1}
    assert Participation("user", ("alice",), history)(3, fleet_pb2.RoundConfig()) is None
    assert stricter_cap(None, 0) is None and stricter_cap(4, None, 2).max_rounds == 2


@pytest.mark.parametrize("unit, expected", [("session", ["s1", "s2", "s3"]),
                                            ("user", ["alice", "s2", "alice"]),
                                            ("site", ["here", "here", "here"])])
def test_units_are_counted_by_the_rule_clipping_uses(tmp_path, toy_model_dir, unit,
                                                     expected) -> None:
    config = site_config(tmp_path, "here", toy_model_dir, "127.0.0.1:1", ANY_KEY,
                         privacy_unit=unit, participation_cap=1)
    sessions = [session("s1", "alice"), session("s2", None), session("s3", "alice")]
    assert [unit_of(config, s) for s in sessions] == expected
    kept, capped = within_cap(config, sessions, {expected[0]: (0,)}, stricter_cap(1))
    assert [s.id for s in capped] == [s.id for s in sessions
                                      if unit_of(config, s) == expected[0]]
    assert [s.id for s in kept] == [s.id for s in sessions if s not in capped]


def test_the_site_cap_is_validated(tmp_path, toy_model_dir) -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="participation_cap"):
            site_config(tmp_path, "here", toy_model_dir, "127.0.0.1:1", ANY_KEY,
                        participation_cap=bad)
    assert site_config(tmp_path, "here", toy_model_dir, "127.0.0.1:1",
                       ANY_KEY).participation_cap is None


def test_old_outbox_records_verify_beside_new_ones(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()
    common = dict(norm_before_clip=1.0, norm_after_clip=1.0, noise_mode="none",
                  noise_multiplier=0.0, scrubbed=ScrubReport(), base_version=0,
                  created_at_ms=1)
    old = OutboxRecord(round_id=1, payload_sha256=payload_sha256(b"1"), session_ids=("s1",),
                       **common)
    new = OutboxRecord(round_id=2, payload_sha256=payload_sha256(b"2"), session_ids=("s2",),
                       privacy_unit="session",
                       participation=ParticipationRecord(2, "session", 1, (("s2", 1),)),
                       **common)
    with Outbox(tmp_path / "outbox.sqlite", key) as outbox:
        outbox.append(old)
        outbox.append(new)
        entries = list(outbox)
        assert entries[0].body == old.to_body() and b"participation" not in entries[0].body
        assert outbox.participation_records() == [new.participation_record]
    assert verify_outbox(entries, key.public_key()) == entries[-1].hash


def test_audit_ledger_shows_the_cap(tmp_path) -> None:
    key = Ed25519PrivateKey.generate()

    def record(round_id: int, cap: int | None) -> RoundRecord:
        return RoundRecord(round_id=round_id, cohort_size=3, dropouts=0, clip_norm=1.0,
                           noise_multiplier=0.8, noise_mode="distributed",
                           epsilon_round=1.0, epsilon_total=2.0 + round_id, delta=1e-5,
                           version=round_id + 1, version_hash=f"{round_id:064x}",
                           privacy_unit="user", participation_cap=cap)

    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0, None))  # an entry from before caps: verifies unchanged
        ledger.append(record(1, 4))
        entries = list(ledger)
    assert b"participation_cap" not in entries[0].body
    report = ledger_report(entries, key.public_key().public_bytes_raw(), "file")
    assert report.ok
    assert [row["participation_cap"] for row in report.rows] == [None, 4]
    assert report.rows[1]["epsilon_meaning"] == "ε per user under cap 4"
    assert "every round composed" in report.rows[0]["epsilon_meaning"]
    assert report.as_json()["privacy_spent"] == "ε per user under cap 4: 3 at δ 1e-05"
