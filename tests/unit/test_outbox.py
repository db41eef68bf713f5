"""The site's outbox: every record reads back as written, survives reopening, and any
edit, reordering or removal is found and named; a record never holds session text."""

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.chains import assert_chained, filled
from support.tamper import flip_last_bit

from fleetmind.aggregation import chain
from fleetmind.aggregation.chain import GENESIS_HASH
from fleetmind.aggregation.participation import MAX_UNIT_ID_CHARS, ParticipationRecord
from fleetmind.aggregation.records import (
    LEDGER_DOMAIN,
    OUTBOX_DOMAIN,
    SCRUB_KINDS,
    OutboxEntry,
    OutboxError,
    OutboxRecord,
    participation_records,
    payload_sha256,
    verify_outbox,
)
from fleetmind.client.outbox import Outbox
from fleetmind.client.scrub import KINDS, ScrubReport
from fleetmind.client.store import MAX_ID_CHARS, Message, Session


def record(round_id: int, **changes) -> OutboxRecord:
    values = dict(round_id=round_id, payload_sha256=payload_sha256(b"masked %d" % round_id),
                  norm_before_clip=2.5, norm_after_clip=1.0, noise_mode="distributed",
                  noise_multiplier=0.8, session_ids=("s-2", "s-1"),
                  scrubbed=ScrubReport(email=2, phone=1), base_version=round_id,
                  created_at_ms=1_700_000_000_000 + round_id)
    return OutboxRecord(**{**values, **changes})


@pytest.fixture
def outbox(tmp_path: Path, key):
    yield from filled(Outbox(tmp_path / "outbox.sqlite", key), map(record, range(5)))


def test_appended_records_read_back_and_verify(outbox, key) -> None:
    entries = list(outbox)
    assert_chained(entries, 5, GENESIS_HASH)
    assert [e.record for e in entries] == [record(r) for r in range(5)]
    assert entries[1].record.session_ids == ("s-1", "s-2")  # stored sorted
    assert entries[1].record.scrub_counts == {kind: {"email": 2, "phone": 1}.get(kind, 0)
                                              for kind in KINDS}
    assert verify_outbox(entries, key.public_key()) == outbox.head().hash == outbox.verify()
    assert verify_outbox(entries, key.public_key().public_bytes_raw()) == entries[-1].hash
    assert outbox.for_round(3) == [entries[3]] and outbox.for_round(99) == []
    assert list(outbox.entries(from_index=3)) == entries[3:]


def test_a_retried_round_is_recorded_again_but_rounds_never_go_back(outbox) -> None:
    outbox.append(record(4, payload_sha256="0" * 64))
    assert len(outbox.for_round(4)) == 2
    head = outbox.head()
    with pytest.raises(OutboxError, match="before the last recorded round 4"):
        outbox.append(record(3))
    assert outbox.head() == head
    outbox.verify()


def test_reopening_keeps_everything(tmp_path, key) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, key) as outbox:
        first = [outbox.append(record(r)) for r in range(3)]
        kept_head = outbox.verify()
    with Outbox(path, key) as outbox:
        assert list(outbox) == first
        outbox.append(record(3))
        assert outbox.verify(expected_head=kept_head) == outbox.head().hash
        assert outbox._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def _rebody(entry: OutboxEntry, **changes) -> OutboxEntry:
    """An edited record, re-hashed so only the signature shows it."""
    body = dataclasses.replace(entry.record, **changes).to_body()
    digest = chain.entry_hash(OUTBOX_DOMAIN, entry.index, entry.prev_hash, body)
    return dataclasses.replace(entry, body=body, hash=digest)


@pytest.mark.parametrize("change, message", [
    (lambda e: dataclasses.replace(e, index=e.index + 1), "reordered"),
    (lambda e: dataclasses.replace(e, prev_hash=flip_last_bit(e.prev_hash)), "does not follow"),
    (lambda e: dataclasses.replace(e, body=e.body.replace(b'"email":2', b'"email":0')),
     "altered"),
    (lambda e: dataclasses.replace(e, hash=flip_last_bit(e.hash)), "altered"),
    (lambda e: dataclasses.replace(e, signature=flip_last_bit(e.signature)), "signature"),
    (lambda e: _rebody(e, norm_before_clip=9.0), "signature"),
])
def test_tampering_names_the_entry(outbox, key, change, message) -> None:
    entries = list(outbox)
    entries[2] = change(entries[2])
    with pytest.raises(OutboxError, match=message) as caught:
        verify_outbox(entries, key.public_key())
    assert caught.value.index == 2
    assert str(caught.value).startswith("outbox entry 2:")


def test_reordering_and_deletion_name_the_entry(outbox, key) -> None:
    entries = list(outbox)
    swapped = [*entries[:1], entries[2], entries[1], *entries[3:]]
    with pytest.raises(OutboxError, match="reordered") as caught:
        verify_outbox(swapped, key.public_key())
    assert caught.value.index == 1
    with pytest.raises(OutboxError) as caught:
        verify_outbox([*entries[:3], *entries[4:]], key.public_key())
    assert caught.value.index == 3
    renumbered = [*entries[:3], dataclasses.replace(entries[4], index=3)]
    with pytest.raises(OutboxError, match="does not follow") as caught:
        verify_outbox(renumbered, key.public_key())
    assert caught.value.index == 3
    with pytest.raises(OutboxError, match="cut off"):
        verify_outbox(entries[:-1], key.public_key(), expected_head=entries[-1].hash)


def test_another_key_or_another_log_does_not_verify(outbox, key) -> None:
    with pytest.raises(OutboxError, match="identity key") as caught:
        verify_outbox(outbox, Ed25519PrivateKey.generate().public_key())
    assert caught.value.index == 0
    # The same bytes chained under the ledger's domain are not outbox entries.
    head = None
    forged = []
    for entry in outbox:
        index, prev, digest, signature = chain.seal(LEDGER_DOMAIN, key, head, entry.body)
        head = OutboxEntry(index, prev, entry.body, digest, signature)
        forged.append(head)
    with pytest.raises(OutboxError, match="altered") as caught:
        verify_outbox(forged, key.public_key())
    assert caught.value.index == 0


def test_sqlite_refuses_updates_and_deletes(outbox) -> None:
    db = sqlite3.connect(outbox.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE entries SET body = x'00' WHERE idx = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM entries WHERE idx = 4")
    db.close()
    outbox.verify()


def test_a_record_never_holds_session_text() -> None:
    session = Session(id="s-1", messages=(Message("user", "my card is 4111 1111 1111 1111"),))
    for ids, message in [((session,), "never the session"),
                         (({"id": "s-1", "messages": []},), "never the session"),
                         (("my card is 4111 1111 1111 1111",), "not a session id"),
                         (("x" * 201,), "not a session id"),
                         (("a\nb",), "not a session id"), (("",), "not a session id"),
                         ("s-1", "sequence"), (("s-1", "s-1"), "twice")]:
        with pytest.raises(ValueError, match=message):
            record(0, session_ids=ids)


def test_the_schema_counts_what_the_scrubber_reports_and_bounds_ids_as_the_store() -> None:
    # The record schema lives next to the chain (aggregation/records.py), away from the
    # scrubber and the session store it describes: their kinds and id bound must agree.
    assert SCRUB_KINDS == KINDS
    assert MAX_UNIT_ID_CHARS == MAX_ID_CHARS
    assert record(0, scrubbed=ScrubReport(ip=3)).scrub_counts == {
        kind: 3 if kind == "ip" else 0 for kind in KINDS}


@pytest.mark.parametrize("change, message", [
    ({"norm_before_clip": -1.0}, "norm_before_clip"),
    ({"norm_after_clip": -0.1}, "norm_after_clip"),
    ({"norm_after_clip": float("nan")}, "finite"),
    ({"norm_before_clip": float("inf")}, "finite"),
    ({"norm_after_clip": 3.0}, "clipping never grows"),
    ({"noise_multiplier": -0.5}, "noise_multiplier"),
    ({"noise_mode": "loud"}, "noise_mode"),
    ({"noise_mode": "none"}, "say which mode"),
    ({"round_id": -1}, "round_id"), ({"round_id": True}, "round_id"),
    ({"base_version": 1.5}, "base_version"),
    ({"payload_sha256": "ABC"}, "64 lowercase hex"),
    ({"scrubbed": {"email": -1}}, "scrubbed"),
    ({"scrubbed": {"names": 3}}, "unknown kinds"),
    ({"privacy_unit": "household"}, "privacy_unit"), ({"clip_norm": -1.0}, "clip_norm"),
    ({"secure_aggregation": "no"}, "secure_aggregation"),
])
def test_records_are_validated_at_construction(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(record(0), **change)


def test_a_non_canonical_body_is_refused() -> None:
    body = record(0).to_body()
    assert OutboxRecord.from_body(body) == record(0)
    with pytest.raises(ValueError, match="canonical"):
        OutboxRecord.from_body(body.replace(b",", b", ", 1))


def test_records_from_before_the_clip_and_mode_fields_read_and_verify_unchanged(key) -> None:
    old = record(3)
    body = old.to_body()
    assert b"privacy_unit" not in body and b"secure_aggregation" not in body
    assert OutboxRecord.from_body(body) == old
    new = record(3, clip_norm=0.5, privacy_unit="user", secure_aggregation=False)
    read = OutboxRecord.from_body(new.to_body())
    assert (read.clip_norm, read.privacy_unit, read.secure_aggregation) == (0.5, "user", False)
    assert new.to_body() != body  # the fields are under the signature


def test_participation_is_signed_and_left_out_when_absent(tmp_path, key) -> None:
    old = record(3)
    assert b"participation" not in old.to_body()  # records from before caps: unchanged
    counts = ParticipationRecord(3, "user", 2, (("bob", 1), ("alice", 2)))
    new = record(3, privacy_unit="user", participation=counts)
    assert new.participation == counts.to_json()  # stored as JSON, whichever form came in
    assert new.participation_record == counts
    assert OutboxRecord.from_body(new.to_body()) == new
    assert new.to_body() != dataclasses.replace(new, participation=None).to_body()
    with Outbox(tmp_path / "outbox.sqlite", key) as outbox:
        first = outbox.append(record(1))
        outbox.append(new)
        outbox.append(record(4, participation=ParticipationRecord(4, "user", 2,
                                                                  (("carol", 1),))))
        assert outbox.participation_records() == [
            counts, ParticipationRecord(4, "user", 2, (("carol", 1),))]
        assert participation_records([first.record]) == []
        entries = list(outbox)
    assert verify_outbox(entries, key.public_key()) == entries[-1].hash
    # Understating a count is an edit like any other: the signature no longer matches.
    forged = dataclasses.replace(new, participation=ParticipationRecord(
        3, "user", 2, (("alice", 1), ("bob", 1)))).to_body()
    entries[1] = OutboxEntry(entries[1].index, entries[1].prev_hash, forged, entries[1].hash,
                             entries[1].signature)
    with pytest.raises(OutboxError) as caught:
        verify_outbox(entries, key.public_key())
    assert caught.value.index == 1


@pytest.mark.parametrize("participation, message", [
    ({"round_id": 3, "privacy_unit": "user", "max_rounds": 2, "counts": {"a": 3}}, "count"),
    ({"round_id": 2, "privacy_unit": "user", "max_rounds": 2, "counts": {"a": 1}}, "round 2"),
    ({"round_id": 3, "privacy_unit": "user", "counts": {"a": 1}}, "participation record"),
    ({"round_id": 3, "privacy_unit": "user", "max_rounds": 0, "counts": {}}, "max_rounds"),
])
def test_participation_is_validated(participation, message) -> None:
    with pytest.raises(ValueError, match=message):
        record(3, participation=participation)
