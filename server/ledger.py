"""The aggregator's ledger file: an entry per round that published or ended without a
version; append-only, hash-chained, signed.

What an entry holds and what must hold between consecutive entries (RoundRecord,
StoppedRound, `ledger_order_problem`, `verify_ledger`) live in
fleetmind.aggregation.records, shared with the auditor, who checks a ledger with them and
no aggregator code. Entry i's hash is

    sha256("fleetmind/ledger/v1" || uint64-le(i) || hash of entry i-1 || body)

with 32 zero bytes before entry 0, and body the canonical JSON of the record; the
aggregator's Ed25519 key signs the hash. So an auditor holding the aggregator's public key
finds any edited, reordered, removed or forged entry (`records.verify_ledger`, which names
the first bad one); cutting entries off the END leaves a shorter valid chain, which only a
head the auditor kept from before (`expected_head`) reveals. The chaining, signing and
checking are fleetmind.aggregation.chain's, shared with the site's outbox; this module
adds storage and refuses an append that may not follow the head.

Storage is fleetmind.runtime.signed_log's (SQLite, WAL, synchronous=FULL): an append that
returned survives a power cut. Triggers refuse UPDATE and DELETE, so code that tries to
rewrite history fails loudly; the chain and signatures catch whoever edits the file by
other means.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.records import (
    LEDGER_DOMAIN,
    LedgerEntry,
    LedgerError,
    LedgerRecord,
    ledger_order_problem,
    verify_ledger,
)
from fleetmind.runtime.signed_log import SignedLog
from fleetmind.server.waiters import Waiters

__all__ = ["Ledger"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL UNIQUE,
    prev_hash BLOB NOT NULL,
    body BLOB NOT NULL,
    hash BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_never_updated BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: entries are never updated'); END;
CREATE TRIGGER IF NOT EXISTS entries_never_deleted BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: entries are never deleted'); END;
"""


class Ledger(SignedLog[LedgerEntry]):
    """The ledger file (runtime.layout.LEDGER_FILE in the aggregator's data folder),
    appended to by the one aggregator process that owns it. Safe to use from several
    threads of that process."""

    DOMAIN = LEDGER_DOMAIN
    SCHEMA = _SCHEMA
    ENTRY = LedgerEntry

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey) -> None:
        super().__init__(path, signing_key)
        self.appended = Waiters()  # StreamLedger followers sleep on it until an append

    def append(self, record: LedgerRecord, notify: bool = True) -> LedgerEntry:
        """Chains, signs and stores `record`; refuses a round already recorded (look it up
        with `find_round` after a restart) or one that may not follow the head. notify False:
        the caller wakes the followers itself (`appended.notify()`), as the coordinator does
        once the round that appended is done."""

        def admit(head: LedgerEntry | None) -> None:
            problem = None if head is None else ledger_order_problem(record, head.record)
            if problem is not None:
                raise LedgerError(None, f"refused: {problem}")

        entry = self._append(record.round_id, record.to_body(), admit)
        if notify:
            self.appended.notify()
        return entry

    def find_round(self, round_id: int) -> LedgerEntry | None:
        found = self._for_round(round_id)  # round_id is UNIQUE: at most one
        return found[0] if found else None

    def verify(self, expected_head: bytes | None = None) -> bytes:
        return verify_ledger(self.entries(), self.public_key, expected_head)
