"""The site's outbox file: the signed log in which, before any byte of an update leaves, the
site records what it is about to send, and in which `fleetmind client forget` records each
deletion.

What an entry holds and what makes the chain valid (OutboxRecord, ForgetRecord, the round
order among uploads, `verify_outbox`) live in fleetmind.aggregation.records, shared with
the auditor, who checks an outbox with them and no site code; this module stores the log.
The site's operator, or an auditor holding the site's public key, can check it
(`Outbox.verify` / `records.verify_outbox`) and compare payload hashes with what the
aggregator says it received.

Storage is fleetmind.runtime.signed_log's (SQLite, WAL, synchronous=FULL): a record that
`append` returned survives a power cut, so a payload is never sent without its record on
disk. Triggers refuse UPDATE and DELETE; the chain and signatures catch edits made by
other means. This module holds the schema and the rules of appending.

Deletions name the user only as HMAC-SHA256(site salt, user id) (records.user_hmac): the
salt is 32 random bytes kept with the site (`FORGET_SALT_FILE` in its data folder, never in
the log; the record carries its sha256), which the operator hands an auditor on request.
Deletions carry no round: the table's (unsigned) round_id column holds FORGET_ROUND (-1)
for them, so the schema is unchanged, `for_round` never returns them, and the round-order
rule applies to uploads only. `Outbox.entries()` and iteration give the upload entries,
which is what everything that sends or counts reads; `chain()` gives every entry and
`deletions()` the deletion records.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.participation import ParticipationRecord
from fleetmind.aggregation.records import (
    OUTBOX_DOMAIN,
    ForgetRecord,
    OutboxEntry,
    OutboxError,
    OutboxRecord,
    participation_records,
    verify_outbox,
)
from fleetmind.runtime.durable import atomic_write
from fleetmind.runtime.signed_log import COLUMNS, SignedLog

__all__ = ["FORGET_ROUND", "FORGET_SALT_FILE", "Outbox", "forget_salt"]

FORGET_ROUND = -1  # the round_id column of a deletion's row: it belongs to no round
FORGET_SALT_FILE = "forget.salt"  # in the site's data folder: the key of records.user_hmac
_SALT_BYTES = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    body BLOB NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_round ON entries(round_id);
CREATE TRIGGER IF NOT EXISTS entries_never_updated BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the outbox is append-only: entries are never updated'); END;
CREATE TRIGGER IF NOT EXISTS entries_never_deleted BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the outbox is append-only: entries are never deleted'); END;
"""


def forget_salt(data_dir: Path, create: bool = True) -> bytes:
    """The site's forget salt (`FORGET_SALT_FILE` in `data_dir`): 32 random bytes, made on
    first use (mode 0600, atomically: of two processes creating it, one wins and both use
    its bytes). Keep it with the site's data: without it no deletion record can be matched
    to a user id, by the operator or an auditor."""
    path = Path(data_dir) / FORGET_SALT_FILE
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            atomic_write(path, os.urandom(_SALT_BYTES), 0o600, replace=False)
    try:
        salt = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"no forget salt at {path}") from None
    if len(salt) != _SALT_BYTES:
        raise ValueError(f"{path} holds {len(salt)} bytes, not a {_SALT_BYTES}-byte salt")
    return salt


class Outbox(SignedLog[OutboxEntry]):
    """The outbox file of one site (runtime.layout.OUTBOX_FILE in its data folder), signed
    with the site's identity key. Safe to use from several threads of the site process."""

    DOMAIN = OUTBOX_DOMAIN
    SCHEMA = _SCHEMA
    ENTRY = OutboxEntry

    def __init__(self, path: Path, identity_key: Ed25519PrivateKey) -> None:
        super().__init__(path, identity_key)

    def append(self, record: OutboxRecord) -> OutboxEntry:
        """Chains, signs and durably stores `record`; call it before sending the payload.
        A retry of the same round appends again (each send is recorded); a round older than
        the last recorded one is refused."""
        if not isinstance(record, OutboxRecord):
            raise TypeError(f"append takes an OutboxRecord, not a {type(record).__name__}"
                            + (" (record a deletion with append_forget)"
                               if isinstance(record, ForgetRecord) else ""))

        def admit(head: OutboxEntry | None) -> None:
            # The last upload, not the head: a deletion after it carries no round.
            last = head if head is None or not head.is_forget else self._row(
                f"SELECT {COLUMNS} FROM entries WHERE round_id >= 0 ORDER BY idx DESC "
                "LIMIT 1")
            if last is not None and record.round_id < last.record.round_id:
                raise OutboxError(None, f"round {record.round_id} is before the last "
                                        f"recorded round {last.record.round_id}")

        return self._append(record.round_id, record.to_body(), admit)

    def append_forget(self, record: ForgetRecord) -> OutboxEntry:
        """Chains, signs and durably stores a deletion record (any time: it has no round)."""
        if not isinstance(record, ForgetRecord):
            raise TypeError(f"append_forget takes a ForgetRecord, not a "
                            f"{type(record).__name__}")
        return self._append(FORGET_ROUND, record.to_body(), lambda head: None)

    def chain(self, from_index: int = 0) -> Iterator[OutboxEntry]:
        """Every entry in order from `from_index`, deletions included: the whole chain."""
        return super().entries(from_index)

    def entries(self, from_index: int = 0) -> Iterator[OutboxEntry]:
        """The upload entries in order from `from_index` (what iterating the outbox gives:
        every caller that reads `entry.record`); `chain()` has the deletions too."""
        return (entry for entry in self.chain(from_index) if not entry.is_forget)

    def deletions(self) -> list[tuple[OutboxEntry, ForgetRecord]]:
        """Every deletion recorded, oldest first, with its entry."""
        return [(entry, entry.forget) for entry in self.chain() if entry.is_forget]

    def for_round(self, round_id: int) -> list[OutboxEntry]:
        """Every record of `round_id`, oldest first (more than one if a send was retried)."""
        return self._for_round(round_id) if round_id >= 0 else []

    def verify(self, expected_head: bytes | None = None) -> bytes:
        return verify_outbox(self.chain(), self.public_key, expected_head)

    def participation_records(self) -> list[ParticipationRecord]:
        """The participation records of every entry, oldest first (see
        records.participation_records)."""
        return participation_records(entry.record for entry in self.entries())
