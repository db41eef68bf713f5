"""The aggregator's ledger: an entry per round that published or ended without a version;
append-only, hash-chained, signed.

Each entry records what the round did to privacy and to the model: cohort size, dropouts,
clip norm, noise, epsilon spent by the round and in total, whether the sum was securely
aggregated, and the sha256 of the version's manifest (which lists the sha256 of every file
of the version). A round that ended without a version gets an entry too (`StoppedRound`,
its body marked `"kind": "round_stopped"`): its unmasked sum refused by the aggregate checks
or not mergeable, the protocol aborted (too few sites or shares), or the aggregator
restarted mid-round; which round, which phase, why, the numbers, the epsilon it spent, the
receipts of the vectors it received and the sites it quarantined, so an auditor sees every
round a site's upload entered, and privacy spent without a version. Entries from before it
have no "kind" and verify unchanged. Entry i's hash is

    sha256("fleetmind/ledger/v1" || uint64-le(i) || hash of entry i-1 || body)

with 32 zero bytes before entry 0, and body the canonical JSON of the record; the
aggregator's Ed25519 key signs the hash. So an auditor holding the aggregator's public key
finds any edited, reordered, removed or forged entry (`verify_chain`, which names the first
bad one); cutting entries off the END leaves a shorter valid chain, which only a head the
auditor kept from before (`expected_head`) reveals. The chaining, signing and checking
are fleetmind.aggregation.chain's, shared with the site's outbox; this module adds the
round record, what must hold between consecutive rounds, and storage.

Storage is fleetmind.runtime.signed_log's (SQLite, WAL, synchronous=FULL): an append that
returned survives a power cut. Triggers refuse UPDATE and DELETE, so code that tries to
rewrite history fails loudly; the chain and signatures catch whoever edits the file by
other means.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)

from fleetmind.aggregation import chain
from fleetmind.aggregation.chain import GENESIS_HASH, ChainEntry, ChainError
from fleetmind.aggregation.dp import check_privacy_unit
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.aggregation.secagg.messages import DropReason
from fleetmind.runtime.signed_log import SignedLog, canonical_json

DOMAIN = b"fleetmind/ledger/v1"
__all__ = ["CHECKS", "DOMAIN", "GENESIS_HASH", "STOP_OUTCOMES", "Ledger", "LedgerEntry",
           "LedgerError", "LedgerRecord", "RoundRecord", "StoppedRound", "entry_hash",
           "parse_body", "verify_chain"]

_SHA256 = re.compile(r"[0-9a-f]{64}")

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


class LedgerError(ChainError):
    """The chain is broken at `index` (its position in the sequence checked), or an append
    was refused (index None)."""

    label = "ledger entry"


@dataclass(frozen=True)
class RoundRecord:
    """What one published round did. cohort_size: sites whose vectors are in the sum;
    dropouts: sites that joined the cohort and left before the sum. epsilon_round: what
    this round spent; epsilon_total: the accountant's total after it, both at `delta`.
    version_hash: sha256 (hex) of the published version's manifest.json. payload_sha256s:
    the aggregator's receipts, sha256 (hex, sorted) of each masked vector in the sum, so a
    site's auditor can match its outbox against what the aggregator summed (masked vectors
    look random: their hashes reveal nothing). Entries written before it have none.
    secure_aggregation: False when the round summed unmasked vectors (the loopback-only
    ablation, config cohort.secure_aggregation): the aggregator saw each site's vector, and
    the receipts are then hashes of plain updates. Written only when false, so an entry
    without it (every entry from before the flag) was securely aggregated. privacy_unit:
    what each clip of clip_norm bounds, and so what epsilon is for (session, user or site);
    entries from before it was recorded have none, and say nothing about it.
    participation_cap: K, the most rounds each privacy unit may enter over the fleet's life
    (aggregation.participation), when the round ran under one: epsilon_total is then the
    most any one unit has lost over the fleet's life (accountant.epsilon_per_unit), not the
    composition of every round. Written only when set, so entries without a cap (every
    entry from before it) read and verify unchanged."""

    round_id: int
    cohort_size: int
    dropouts: int
    clip_norm: float
    noise_multiplier: float
    noise_mode: str
    epsilon_round: float
    epsilon_total: float
    delta: float
    version: int
    version_hash: str
    payload_sha256s: tuple[str, ...] = ()
    secure_aggregation: bool = True
    privacy_unit: str | None = None
    participation_cap: int | None = None
    recorded_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    def __post_init__(self) -> None:
        for name in ("round_id", "cohort_size", "dropouts", "version", "recorded_at_ms"):
            _whole(name, getattr(self, name))
        for name in ("clip_norm", "noise_multiplier", "epsilon_round", "epsilon_total",
                     "delta"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.cohort_size < 2:
            raise ValueError(f"cohort_size={self.cohort_size}: a published sum has >= 2 sites")
        if self.clip_norm <= 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be > 0")
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"secure_aggregation={self.secure_aggregation!r} must be true or "
                             "false")
        if self.privacy_unit is not None:
            check_privacy_unit(self.privacy_unit)
        if self.participation_cap is not None:
            ParticipationCap(self.participation_cap)  # a whole number >= 1
        if self.noise_mode not in ("distributed", "central", "local", "none"):
            raise ValueError(f"noise_mode={self.noise_mode!r} must be distributed, central, "
                             "local or none")
        if self.epsilon_total < self.epsilon_round:
            raise ValueError(f"epsilon_total={self.epsilon_total} is below this round's "
                             f"epsilon_round={self.epsilon_round}")
        if not self.delta < 1:
            raise ValueError(f"delta={self.delta} must be < 1")
        if not _SHA256.fullmatch(self.version_hash):
            raise ValueError(f"version_hash={self.version_hash!r} must be 64 lowercase hex")
        object.__setattr__(self, "payload_sha256s", _receipts(self.payload_sha256s))

    def to_body(self) -> bytes:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.payload_sha256s:  # entries from before receipts were recorded
            del body["payload_sha256s"]
        else:
            body["payload_sha256s"] = list(self.payload_sha256s)
        if self.secure_aggregation:  # entries from before the flag, and every masked round
            del body["secure_aggregation"]
        if self.privacy_unit is None:  # entries from before the unit was recorded
            del body["privacy_unit"]
        if self.participation_cap is None:  # rounds without a cap, and entries before caps
            del body["participation_cap"]
        return canonical_json(body)

    @classmethod
    def from_body(cls, body: bytes) -> RoundRecord:
        record = cls(**json.loads(body))
        if record.to_body() != body:
            raise ValueError("body is not in canonical form")
        return record


STOPPED = "round_stopped"  # the "kind" of a StoppedRound's body
# rejected: an aggregate check refused the sum (its charge is spent: the aggregator saw it);
# merge_failed: the sum could not be merged into the adapter (nothing spent);
# aborted: the protocol ended the round before any sum (`drop_reason` says why; nothing
# spent); abandoned: the aggregator restarted mid-round (nothing released or spent).
STOP_OUTCOMES = ("rejected", "merge_failed", "aborted", "abandoned")
DROP_REASONS = frozenset(reason.value for reason in DropReason)
# The aggregate checks (server/coordinator.py, docs/hardening.md): the weight sum's range,
# finite values in the sum, the mean delta's norm, finite values in the merged adapter.
CHECKS = ("weight_sum", "non_finite", "norm", "merged_non_finite")


@dataclass(frozen=True)
class StoppedRound:
    """A round that ended without publishing a version.
    outcome: one of STOP_OUTCOMES; phase: the round phase it stopped in (a RoundPhase
    value: "merge" for rejected and merge_failed); check: which of CHECKS refused it (a
    rejected round's only); drop_reason: why an aborted or abandoned round ended (a
    DropReason value; absent from the body when None, as in entries before it); measured
    and allowed: the checked number and the closed range it had to lie in (None where a
    check has no number: non-finite values, or measured was itself not finite).
    contributors: sites whose vectors the sum held (0 without a sum); version: the latest
    version, which stays the latest; epsilon_round: what this round spent (0: nothing);
    epsilon_total: the accountant's total after it, at `delta`; payload_sha256s: the
    receipts (sorted) of the masked vectors in the sum, or, for an aborted round, of every
    vector it received; quarantined: the sites this rejection quarantined (group testing),
    sorted; privacy_unit and participation_cap: what epsilon is for, as in RoundRecord."""

    round_id: int
    outcome: str
    phase: str
    check: str | None
    measured: float | None
    allowed: tuple[float, float] | None
    contributors: int
    version: int
    epsilon_round: float
    epsilon_total: float
    delta: float
    payload_sha256s: tuple[str, ...] = ()
    quarantined: tuple[int, ...] = ()
    privacy_unit: str | None = None
    participation_cap: int | None = None
    drop_reason: str | None = None
    kind: str = STOPPED
    recorded_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    def __post_init__(self) -> None:
        if self.kind != STOPPED:
            raise ValueError(f"kind={self.kind!r} must be {STOPPED!r}")
        for name in ("round_id", "contributors", "version", "recorded_at_ms"):
            _whole(name, getattr(self, name))
        for name in ("epsilon_round", "epsilon_total", "delta"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if self.outcome not in STOP_OUTCOMES:
            raise ValueError(f"outcome={self.outcome!r} must be one of {STOP_OUTCOMES}")
        if not isinstance(self.phase, str) or not re.fullmatch(r"[a-z_]{1,40}", self.phase):
            raise ValueError(f"phase={self.phase!r} must be a round phase's name")
        if (self.check is None) == (self.outcome == "rejected") or \
                (self.check is not None and self.check not in CHECKS):
            raise ValueError(f"check={self.check!r}: a rejected round names one of {CHECKS}, "
                             "other outcomes none")
        if self.drop_reason is not None and self.drop_reason not in DROP_REASONS:
            raise ValueError(f"drop_reason={self.drop_reason!r} must be one of "
                             f"{sorted(DROP_REASONS)}")
        if self.measured is not None and (isinstance(self.measured, bool) or not isinstance(
                self.measured, int | float) or not math.isfinite(self.measured)):
            raise ValueError(f"measured={self.measured!r} must be a finite number or null")
        if self.allowed is not None:
            if not isinstance(self.allowed, list | tuple) or len(self.allowed) != 2:
                raise ValueError(f"allowed={self.allowed!r} must be [low, high] or null")
            low, high = (_finite("allowed", v) for v in self.allowed)
            if low > high:
                raise ValueError(f"allowed=[{low}, {high}] is empty")
            object.__setattr__(self, "allowed", (low, high))
        if self.epsilon_total < self.epsilon_round:
            raise ValueError(f"epsilon_total={self.epsilon_total} is below this round's "
                             f"epsilon_round={self.epsilon_round}")
        if not self.delta < 1:
            raise ValueError(f"delta={self.delta} must be < 1")
        if self.privacy_unit is not None:
            check_privacy_unit(self.privacy_unit)
        if self.participation_cap is not None:
            ParticipationCap(self.participation_cap)  # a whole number >= 1
        object.__setattr__(self, "payload_sha256s", _receipts(self.payload_sha256s))
        if not isinstance(self.quarantined, list | tuple):
            raise ValueError("quarantined must be a list of site ids")
        for site in self.quarantined:
            _whole("quarantined", site)
        object.__setattr__(self, "quarantined", tuple(self.quarantined))
        if list(self.quarantined) != sorted(set(self.quarantined)):
            raise ValueError("quarantined must be sorted and distinct")

    def to_body(self) -> bytes:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["payload_sha256s"] = list(self.payload_sha256s)
        body["quarantined"] = list(self.quarantined)
        body["allowed"] = None if self.allowed is None else list(self.allowed)
        if self.drop_reason is None:
            del body["drop_reason"]  # entries before it have none: their bodies stay canonical
        return canonical_json(body)

    @classmethod
    def from_body(cls, body: bytes) -> StoppedRound:
        record = cls(**json.loads(body))
        if record.to_body() != body:
            raise ValueError("body is not in canonical form")
        return record


LedgerRecord = RoundRecord | StoppedRound


def parse_body(body: bytes) -> LedgerRecord:
    """An entry's record: a StoppedRound when its body says so, else a RoundRecord (every
    entry from before stopped rounds were recorded)."""
    raw = json.loads(body)
    if isinstance(raw, dict) and "kind" in raw:
        return StoppedRound.from_body(body)
    return RoundRecord.from_body(body)


def _whole(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def _receipts(hashes: object) -> tuple[str, ...]:
    if not isinstance(hashes, list | tuple) or not all(
            isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes):
        raise ValueError("payload_sha256s must be a list of 64-hex-digit sha256 digests")
    if list(hashes) != sorted(set(hashes)):
        raise ValueError("payload_sha256s must be sorted and distinct")
    return tuple(hashes)


def _out_of_order(record: LedgerRecord, last: LedgerRecord) -> str | None:
    """Why `record` may not follow `last` (None: it may): rounds increase; a published
    round's version is above every earlier one, a stopped round's is the latest then (it
    published nothing); epsilon spent never comes back."""
    if record.round_id <= last.round_id:
        return (f"round {record.round_id} is not after round {last.round_id}: rounds must "
                "increase")
    if isinstance(record, RoundRecord) and record.version <= last.version:
        return (f"version {record.version} is not after version {last.version}: versions "
                "must increase")
    if isinstance(record, StoppedRound) and record.version < last.version:
        return (f"a stopped round at version {record.version} is not after version "
                f"{last.version}: versions never go back")
    if record.epsilon_total < last.epsilon_total:
        return (f"epsilon_total {record.epsilon_total} is below the recorded "
                f"{last.epsilon_total}: privacy spent never comes back")
    return None


def entry_hash(index: int, prev_hash: bytes, body: bytes) -> bytes:
    return chain.entry_hash(DOMAIN, index, prev_hash, body)


@dataclass(frozen=True)
class LedgerEntry(ChainEntry):
    """One chained, signed entry, as stored and as Audit.StreamLedger carries it."""

    @property
    def record(self) -> LedgerRecord:
        return parse_body(self.body)


def _check_round(body: bytes, last: LedgerRecord | None) -> LedgerRecord:
    """What must hold between consecutive rounds, on top of the chain itself."""
    try:
        record = parse_body(body)
    except (ValueError, TypeError) as error:
        raise ValueError(f"body is not a valid round record: {error}") from None
    problem = None if last is None else _out_of_order(record, last)
    if problem is not None:
        raise ValueError(problem)
    return record


def verify_chain(entries: Iterable[ChainEntry], public_key: Ed25519PublicKey | bytes,
                 expected_head: bytes | None = None) -> bytes:
    """Checks every entry in order and returns the head hash (GENESIS_HASH when empty).
    Raises LedgerError naming the first entry that is out of place, altered, unsigned,
    or inconsistent with the ones before it. With `expected_head` (a head hash the auditor
    kept from an earlier check), a chain that no longer contains it was cut short."""
    return chain.verify_chain(entries, public_key, domain=DOMAIN, expected_head=expected_head,
                              check=_check_round, signer="the aggregator key",
                              error=LedgerError)


class Ledger(SignedLog[LedgerEntry]):
    """The ledger file, appended to by the one aggregator process that owns it. Safe to use
    from several threads of that process."""

    DOMAIN = DOMAIN
    SCHEMA = _SCHEMA
    ENTRY = LedgerEntry

    def append(self, record: LedgerRecord) -> LedgerEntry:
        """Chains, signs and stores `record`; refuses a round already recorded (look it up
        with `find_round` after a restart) or one that may not follow the head."""

        def admit(head: LedgerEntry | None) -> None:
            problem = None if head is None else _out_of_order(record, head.record)
            if problem is not None:
                raise LedgerError(None, f"refused: {problem}")

        return self._append(record.round_id, record.to_body(), admit)

    def find_round(self, round_id: int) -> LedgerEntry | None:
        found = self._for_round(round_id)  # round_id is UNIQUE: at most one
        return found[0] if found else None

    def verify(self, expected_head: bytes | None = None) -> bytes:
        return verify_chain(self.entries(), self.public_key, expected_head)
