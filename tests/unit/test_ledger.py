"""The ledger: appends chain and sign; an auditor finds every edit, reordering, removal and
forged signature, and is told which entry is the first bad one. Rounds stopped without a
version (rejected aggregates) chain between published ones under the same rules, and
`audit ledger` shows them."""

import dataclasses
import json
import math
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.chains import assert_chained, filled
from support.tamper import flip_last_bit

from fleetmind.aggregation import chain
from fleetmind.aggregation.chain import GENESIS_HASH
from fleetmind.aggregation.merge import cohort_step
from fleetmind.aggregation.records import (
    LEDGER_DOMAIN,
    LedgerEntry,
    LedgerError,
    RoundRecord,
    StoppedRound,
    parse_ledger_body,
    verify_ledger,
)
from fleetmind.cli.main import main
from fleetmind.server.ledger import Ledger


def record(round_id: int, epsilon_total: float | None = None) -> RoundRecord:
    return RoundRecord(round_id=round_id, cohort_size=5, dropouts=1, clip_norm=1.0,
                       noise_multiplier=0.9, noise_mode="distributed", epsilon_round=0.25,
                       epsilon_total=0.25 * (round_id + 1) if epsilon_total is None
                       else epsilon_total, delta=1e-5, version=round_id + 1,
                       version_hash=f"{round_id:064x}", recorded_at_ms=1_700_000_000_000)


@pytest.fixture
def ledger(tmp_path: Path, key):
    yield from filled(Ledger(tmp_path / "ledger.sqlite", key), map(record, range(6)))


def test_appends_chain_and_verify(ledger, key) -> None:
    entries = list(ledger)
    assert_chained(entries, 6, GENESIS_HASH)
    assert [e.record for e in entries] == [record(r) for r in range(6)]
    assert verify_ledger(entries, key.public_key()) == entries[-1].hash == ledger.head().hash
    assert ledger.verify() == entries[-1].hash
    assert ledger.find_round(3) == entries[3] and ledger.find_round(99) is None
    assert list(ledger.entries(from_index=4)) == entries[4:]


def test_the_ledger_survives_reopening(tmp_path, key) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path, key) as ledger:
        ledger.append(record(0))
    with Ledger(path, key) as ledger:
        ledger.append(record(1))
        assert ledger.verify() == ledger.head().hash
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_entries_page_through_a_long_ledger(tmp_path, key) -> None:
    with Ledger(tmp_path / "long.sqlite", key) as ledger:
        for round_id in range(300):
            ledger.append(record(round_id))
        assert [e.index for e in ledger] == list(range(300))
        ledger.verify()


def _replace(entry: LedgerEntry, **changes) -> LedgerEntry:
    return dataclasses.replace(entry, **changes)


def _rebody(entry: LedgerEntry, **changes) -> LedgerEntry:
    """An edited record, re-hashed so only the signature (or the chain after it) shows it."""
    body = dataclasses.replace(entry.record, **changes).to_body()
    digest = chain.entry_hash(LEDGER_DOMAIN, entry.index, entry.prev_hash, body)
    return _replace(entry, body=body, hash=digest)


@pytest.mark.parametrize("field, change", [
    ("index", lambda e: _replace(e, index=e.index + 1)),
    ("prev_hash", lambda e: _replace(e, prev_hash=flip_last_bit(e.prev_hash))),
    ("body", lambda e: _replace(e, body=e.body.replace(b'"dropouts":1', b'"dropouts":0'))),
    ("hash", lambda e: _replace(e, hash=flip_last_bit(e.hash))),
    ("signature", lambda e: _replace(e, signature=flip_last_bit(e.signature))),
    ("body re-hashed", lambda e: _rebody(e, epsilon_round=0.0)),
])
def test_tampering_with_any_field_names_that_entry(ledger, key, field, change) -> None:
    entries = list(ledger)
    entries[3] = change(entries[3])
    with pytest.raises(LedgerError) as caught:
        verify_ledger(entries, key.public_key())
    assert caught.value.index == 3, caught.value


def test_every_record_field_is_covered_by_the_hash(ledger, key) -> None:
    entries = list(ledger)
    fields = dataclasses.fields(RoundRecord)
    for field in fields:
        value = getattr(entries[2].record, field.name)
        edited = {"noise_mode": "central", "version_hash": "f" * 64,
                  "epsilon_round": 0.0, "delta": 1e-6,
                  "payload_sha256s": ("e" * 64,),
                  "secure_aggregation": False, "privacy_unit": "user",
                  "participation_cap": 4}.get(field.name)
        if edited is None and value is None:
            edited = RULED[field.name]
        elif edited is None:
            edited = value + 1
        # units and server_step are recorded together, and the rule with them: adding one
        # adds all.
        changes = RULED if field.name in RULED else {field.name: edited}
        bad = _replace(entries[2], body=dataclasses.replace(
            entries[2].record, **changes).to_body())
        with pytest.raises(LedgerError, match="altered") as caught:
            verify_ledger([*entries[:2], bad, *entries[3:]], key.public_key())
        assert caught.value.index == 2, field.name


def test_reordering_is_detected(ledger, key) -> None:
    entries = list(ledger)
    entries[2], entries[3] = entries[3], entries[2]
    with pytest.raises(LedgerError, match="reordered") as caught:
        verify_ledger(entries, key.public_key())
    assert caught.value.index == 2


def test_deletion_in_the_middle_is_detected(ledger, key) -> None:
    entries = list(ledger)
    del entries[2]
    with pytest.raises(LedgerError) as caught:
        verify_ledger(entries, key.public_key())
    assert caught.value.index == 2


def test_deletion_with_renumbering_still_breaks_the_chain(ledger, key) -> None:
    entries = list(ledger)
    del entries[2]
    entries[2:] = [_replace(e, index=e.index - 1) for e in entries[2:]]
    with pytest.raises(LedgerError, match="does not follow") as caught:
        verify_ledger(entries, key.public_key())
    assert caught.value.index == 2


def test_a_forged_chain_signed_by_another_key_is_refused(tmp_path, key) -> None:
    with Ledger(tmp_path / "forged.sqlite", Ed25519PrivateKey.generate()) as forged:
        forged.append(record(0))
        with pytest.raises(LedgerError, match="signature") as caught:
            verify_ledger(forged, key.public_key())
    assert caught.value.index == 0


def test_cutting_the_end_is_found_with_a_kept_head(ledger, key) -> None:
    entries = list(ledger)
    kept = entries[-1].hash
    assert verify_ledger(entries, key.public_key(), expected_head=kept) == kept
    assert verify_ledger(entries, key.public_key(), expected_head=entries[2].hash) == kept
    with pytest.raises(LedgerError, match="cut off"):
        verify_ledger(entries[:-1], key.public_key(), expected_head=kept)


def test_sqlite_refuses_updates_and_deletes(ledger) -> None:
    db = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE entries SET body = x'00' WHERE idx = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM entries WHERE idx = 5")
    db.close()
    ledger.verify()


def test_appends_that_would_rewrite_history_are_refused(ledger) -> None:
    head = ledger.head()
    for bad, message in [(record(5), "not after"), (record(2), "not after"),
                         (dataclasses.replace(record(6), version=3), "version"),
                         (record(6, epsilon_total=0.3), "below")]:
        with pytest.raises(LedgerError, match=message):
            ledger.append(bad)
    assert ledger.head() == head
    ledger.append(record(6))
    ledger.verify()


def test_records_are_validated_at_the_edge() -> None:
    for change, message in [({"cohort_size": 1}, "cohort_size"),
                            ({"epsilon_round": float("inf")}, "finite"),
                            ({"epsilon_total": 0.1, "epsilon_round": 0.2}, "below"),
                            ({"version_hash": "xyz"}, "hex"), ({"dropouts": -1}, "dropouts"),
                            ({"noise_mode": "loud"}, "noise_mode"), ({"delta": 1.0}, "delta")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(record(0), **change)


def test_the_participation_cap_is_signed_and_left_out_when_absent(tmp_path, key) -> None:
    old = record(2)
    assert b"participation_cap" not in old.to_body()  # entries from before caps: unchanged
    capped = dataclasses.replace(record(2), participation_cap=4)
    assert b'"participation_cap":4' in capped.to_body()
    assert RoundRecord.from_body(capped.to_body()) == capped
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0))
        ledger.append(dataclasses.replace(record(1), participation_cap=4))
        entries = list(ledger)
    assert verify_ledger(entries, key.public_key()) == entries[-1].hash
    assert [e.record.participation_cap for e in entries] == [None, 4]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_rounds"):
            dataclasses.replace(record(0), participation_cap=bad)


STEPPED = {"units": 290, "server_step": 4.0 * (100 / 290) ** 0.5}  # docs/continual.md
# The same round with the rule that gave its step recorded (rate 4, R 117: the bench's).
RULED = {"units": 290, "server_step": cohort_step(4.0, 290, 117), "server_learning_rate": 4.0,
         "server_step_units": 117}

# A published round's body as every aggregator before units and server_step wrote it.
OLD_BODY = (b'{"clip_norm":1.0,"cohort_size":5,"delta":1e-05,"dropouts":1,"epsilon_round":0.25,'
            b'"epsilon_total":0.25,"noise_mode":"distributed","noise_multiplier":0.9,'
            b'"recorded_at_ms":1700000000000,"round_id":0,"version":1,"version_hash":"'
            + b"0" * 64 + b'"}')


def test_a_round_records_its_units_and_server_step_signed(tmp_path, key) -> None:
    stepped = dataclasses.replace(record(1), **STEPPED)
    body = stepped.to_body()
    assert b'"units":290' in body and b'"server_step":2.348' in body
    assert RoundRecord.from_body(body) == stepped == parse_ledger_body(body)
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0))  # an entry from before: neither field
        ledger.append(stepped)
        entries = list(ledger)
    assert entries[0].body == OLD_BODY
    assert verify_ledger(entries, key.public_key()) == entries[-1].hash
    assert [(e.record.units, e.record.server_step) for e in entries] == [
        (None, None), (290, STEPPED["server_step"])]
    # Both are under the signature: a smaller step or fewer units is an altered entry.
    for change in ({"server_step": 1.0}, {"units": 100}):
        forged = dataclasses.replace(stepped, **change).to_body()
        with pytest.raises(LedgerError, match="altered") as caught:
            verify_ledger([entries[0], _replace(entries[1], body=forged)], key.public_key())
        assert caught.value.index == 1
    # An entry signed with the aggregator's key but out of range is refused all the same.
    raw = json.loads(body)
    raw["server_step"] = 0.0
    signed = dataclasses.replace(  # canonical bytes, re-hashed and re-signed
        entries[1], body=json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    digest = chain.entry_hash(LEDGER_DOMAIN, 1, entries[0].hash, signed.body)
    signed = _replace(signed, hash=digest, signature=key.sign(digest))
    with pytest.raises(LedgerError, match=r"not a valid round record.*server_step") as caught:
        verify_ledger([entries[0], signed], key.public_key())
    assert caught.value.index == 1


def test_an_entry_from_before_the_step_parses_and_writes_back_byte_for_byte() -> None:
    old = RoundRecord.from_body(OLD_BODY)
    assert old == record(0) and (old.units, old.server_step) == (None, None)
    assert parse_ledger_body(OLD_BODY) == old and old.to_body() == OLD_BODY


@pytest.mark.parametrize(("change", "message"), [
    ({"units": 0, "server_step": 1.0}, "units=0 must be an integer >= 1"),
    ({"units": -3, "server_step": 1.0}, "units=-3"),
    ({"units": 7.5, "server_step": 1.0}, "units=7.5"),
    ({"units": True, "server_step": 1.0}, "units=True"),
    ({"units": "8", "server_step": 1.0}, "units='8'"),
    ({"units": 4, "server_step": 1.0}, "below cohort_size=5"),  # 5 sites, >= 1 unit each
    ({"units": 8, "server_step": 0.0}, "server_step=0.0 must be > 0"),
    ({"units": 8, "server_step": -1.0}, "server_step=-1.0"),
    ({"units": 8, "server_step": float("nan")}, "finite"),
    ({"units": 8, "server_step": float("inf")}, "finite"),
    ({"units": 8, "server_step": "1.0"}, "server_step='1.0'"),
    ({"units": 8, "server_step": None}, "both"),
    ({"units": None, "server_step": 1.0}, "both"),
])
def test_units_and_server_step_out_of_range_are_refused(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(record(0), **change)
    # ... and so is a signed body that holds them: not a valid round record.
    body = json.loads(OLD_BODY)
    body.update({k: v for k, v in change.items() if v is not None})
    if any(isinstance(v, float) and not math.isfinite(v) for v in body.values()):
        return  # canonical JSON has no NaN or infinity: such a body is never written
    with pytest.raises((ValueError, TypeError)):
        RoundRecord.from_body(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def test_a_round_records_the_rule_that_gave_its_step(tmp_path, key) -> None:
    """The rate and R go into the signed body beside the step, an auditor recomputes the
    step from them, and an entry whose step is not what its rule gives is refused."""
    ruled = dataclasses.replace(record(1), **RULED)
    body = ruled.to_body()
    assert b'"server_learning_rate":4.0' in body and b'"server_step_units":117' in body
    assert RoundRecord.from_body(body) == ruled == parse_ledger_body(body)
    # No R: every round steps the rate, and the body has no server_step_units.
    flat = dataclasses.replace(record(1), units=290, server_step=4.0, server_learning_rate=4.0)
    assert b"server_step_units" not in flat.to_body()
    assert RoundRecord.from_body(flat.to_body()) == flat
    # At or under R units the step is the rate.
    assert dataclasses.replace(record(1), units=100, server_step=4.0, server_learning_rate=4.0,
                               server_step_units=117).server_step == 4.0
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(dataclasses.replace(record(0), **STEPPED))  # step without its rule
        ledger.append(ruled)
        entries = list(ledger)
    assert verify_ledger(entries, key.public_key()) == entries[-1].hash
    assert b"server_learning_rate" not in entries[0].body
    # A larger step than the rule gives, signed with the aggregator's key all the same.
    raw = json.loads(body)
    raw["server_step"] = 4.0
    signed = dataclasses.replace(
        entries[1], body=json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    digest = chain.entry_hash(LEDGER_DOMAIN, 1, entries[0].hash, signed.body)
    signed = _replace(signed, hash=digest, signature=key.sign(digest))
    with pytest.raises(LedgerError, match=r"server_step=4.0 is not the step its rule gives "
                                          r"\(4 x 117 / 290 = 1.61") as caught:
        verify_ledger([entries[0], signed], key.public_key())
    assert caught.value.index == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"server_step": 4.0}, "is not the step its rule gives"),
    ({"server_learning_rate": 2.0}, "is not the step its rule gives"),
    ({"server_step_units": 100}, "is not the step its rule gives"),
    ({"server_step_units": None}, "is not the step its rule gives"),
    ({"server_learning_rate": 0.0}, "server_learning_rate=0.0 must be > 0"),
    ({"server_learning_rate": -4.0}, "server_learning_rate=-4.0"),
    ({"server_learning_rate": float("nan")}, "finite"),
    ({"server_learning_rate": "4.0"}, "server_learning_rate='4.0'"),
    ({"server_step_units": 0}, "server_step_units=0 must be an integer >= 1"),
    ({"server_step_units": 1.5}, "server_step_units=1.5"),
    ({"server_step_units": True}, "server_step_units=True"),
    ({"server_learning_rate": None}, "without server_learning_rate"),
    ({"units": None, "server_step": None}, "without units and server_step"),
])
def test_a_step_rule_out_of_range_or_disagreeing_with_its_step_is_refused(change, message
                                                                          ) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(record(1), **{**RULED, **change})


def test_audit_ledger_shows_each_rounds_step_and_units(tmp_path, key, capsys) -> None:
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0))  # from before the step was recorded
        ledger.append(dataclasses.replace(record(1), **STEPPED))  # ... before its rule
        ledger.append(dataclasses.replace(record(2), **RULED))
    pub = tmp_path / "aggregator.pub"
    pub.write_bytes(key.public_key().public_bytes_raw())
    argv = ["audit", "ledger", "--file", str(tmp_path / "ledger.sqlite"),
            "--aggregator-key", str(pub)]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rounds"]
    assert [(row["units"], row["server_step"]) for row in rows] == [
        (None, None), (290, STEPPED["server_step"]), (290, RULED["server_step"])]
    assert [(row["server_learning_rate"], row["server_step_units"]) for row in rows] == [
        (None, None), (None, None), (4.0, 117)]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table wraps its cells
    assert "server step" in out and "not recorded" in out
    assert "2.349 (290 units; rule not recorded)" in out
    assert "1.614 = 4 × 117/290 units" in out


def stopped(round_id: int, version: int, epsilon_total: float, **changes) -> StoppedRound:
    """Round `round_id` rejected by the weight-sum check at `version` (nothing published)."""
    return StoppedRound(**{
        "round_id": round_id, "outcome": "rejected", "phase": "merge", "check": "weight_sum",
        "measured": 7.5, "allowed": (0.03, 3.0), "contributors": 3, "version": version,
        "epsilon_round": 0.25, "epsilon_total": epsilon_total, "delta": 1e-5,
        "payload_sha256s": (f"{1:064x}", f"{2:064x}"), "quarantined": (7,),
        "recorded_at_ms": 1_700_000_000_000, **changes})


def test_a_stopped_round_is_chained_between_published_rounds(tmp_path, key) -> None:
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0))  # version 1, epsilon 0.25
        ledger.append(stopped(1, 1, 0.5))
        ledger.append(dataclasses.replace(record(2), version=2, epsilon_total=0.75))
        entries = list(ledger)
        assert ledger.find_round(1) == entries[1]
    assert verify_ledger(entries, key.public_key()) == entries[-1].hash
    assert [type(e.record) for e in entries] == [RoundRecord, StoppedRound, RoundRecord]
    assert entries[1].record == stopped(1, 1, 0.5)
    assert parse_ledger_body(entries[1].body) == stopped(1, 1, 0.5)
    # Published entries keep the form every older ledger has: no "kind".
    assert entries[0].body == record(0).to_body() and b"kind" not in entries[0].body
    assert b'"kind":"round_stopped"' in entries[1].body and b'"quarantined":[7]' in entries[1].body


def test_a_stopped_round_must_follow_the_ledger_like_any_round(tmp_path, key) -> None:
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0))  # round 0, version 1, epsilon 0.25
        for bad, message in [(stopped(0, 1, 0.5), "round 0 is not after"),
                             (stopped(1, 0, 0.5), "versions never go back"),
                             (stopped(1, 1, 0.2, epsilon_round=0.1), "below the recorded")]:
            with pytest.raises(LedgerError, match=message):
                ledger.append(bad)
        ledger.append(stopped(1, 1, 0.5))
        # A published round after it still needs a new version and no less epsilon.
        for bad, message in [(dataclasses.replace(record(2), version=1), "version 1 is not"),
                             (dataclasses.replace(record(2), version=2, epsilon_total=0.4),
                              "below the recorded")]:
            with pytest.raises(LedgerError, match=message):
                ledger.append(bad)
        assert [e.index for e in ledger] == [0, 1]
        entries = list(ledger)
    # The same rules at verification: a stopped entry signed out of order is named.
    forged = stopped(2, 0, 0.5).to_body()
    digest = chain.entry_hash(LEDGER_DOMAIN, 2, entries[1].hash, forged)
    bad = LedgerEntry(2, entries[1].hash, forged, digest, key.sign(digest))
    with pytest.raises(LedgerError, match="versions never go back") as caught:
        verify_ledger([*entries, bad], key.public_key())
    assert caught.value.index == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"outcome": "vanished"}, "outcome"),
    ({"check": None}, "a rejected round names one of"),
    ({"outcome": "merge_failed"}, "other outcomes none"),
    ({"outcome": "aborted"}, "other outcomes none"),
    ({"check": None, "outcome": "aborted", "drop_reason": "bored"}, "drop_reason"),
    ({"check": "vibes"}, "a rejected round names one of"),
    ({"measured": float("nan")}, "measured"),
    ({"allowed": (3.0, 1.0)}, "empty"),
    ({"allowed": (1.0,)}, r"\[low, high\]"),
    ({"quarantined": (9, 7)}, "sorted"),
    ({"phase": "Merge; drop table"}, "phase"),
    ({"kind": "round"}, "kind"),
    ({"epsilon_round": 1.0}, "below this round's"),
])
def test_stopped_records_are_validated_at_the_edge(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        stopped(1, 1, 0.5, **change)


def test_audit_ledger_shows_a_stopped_round_and_verifies_the_chain(tmp_path, key,
                                                                     capsys) -> None:
    with Ledger(tmp_path / "ledger.sqlite", key) as ledger:
        ledger.append(record(0))
        ledger.append(stopped(1, 1, 0.5))
    pub = tmp_path / "aggregator.pub"
    pub.write_bytes(key.public_key().public_bytes_raw())
    argv = ["audit", "ledger", "--file", str(tmp_path / "ledger.sqlite"),
            "--aggregator-key", str(pub)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["verified"] == 2 and len(report["rounds"]) == 1
    (row,) = report["stopped_rounds"]
    assert {k: row[k] for k in ("entry", "round", "outcome", "phase", "check", "measured",
                                "allowed", "quarantined", "epsilon_total")} == {
        "entry": 1, "round": 1, "outcome": "rejected", "phase": "merge",
        "check": "weight_sum", "measured": 7.5, "allowed": [0.03, 3.0], "quarantined": [7],
        "epsilon_total": 0.5}
    assert report["privacy_spent"].endswith(": 0.5 at δ 1e-05")  # the rejected round spent
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 of 2 entries verified" in out and "rounds stopped without a version" in out
    assert "weight_sum" in out and "[0.03, 3]" in out
