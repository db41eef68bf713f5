"""What the two signed logs hold, and what makes either one valid: the site's outbox
(uploads and deletions) and the aggregator's ledger (rounds published and rounds stopped
without a version), as typed records validated at construction, each log's rule between
consecutive entries, and its chain check (fleetmind.aggregation.chain, with the log's own
domain, so an outbox entry never verifies as a ledger entry or the other way round).

Pure: no I/O. The side that writes a log stores it (client/outbox.py, server/ledger.py,
over fleetmind.runtime.signed_log); the auditor (audit/) reads and checks it with this
module alone, so checking one side needs neither side's code. A body is the canonical JSON
of its record (fleetmind.aggregation.manifest.canonical_json): the same bytes whoever
writes them, and a body that is not in canonical form is refused.

The outbox: before any byte of an update leaves, the site records what it is about to
send. One entry per upload (`OutboxRecord`): round, sha256 of the payload, the update's L2
norm before and after clipping, the noise it carries, the ids (never the text) of the
sessions that contributed, what the scrubber removed (counts by kind), the version it was
computed against, and when. `fleetmind client forget` appends a `ForgetRecord` to the same
chain (a body with `"kind": "forget"`; an upload body has no `kind`, so every upload
record, old or new, keeps its bytes). It names the user only as HMAC-SHA256(site salt,
user id) (`user_hmac`); the record carries the salt's sha256, and an auditor handed the
salt recomputes the HMAC from the user id (`ForgetRecord.names`). A plain sha256 of the id
would be guessable from a list of emails; a hash keyed with a site secret that is never
shared could not be checked by anyone. Deletions carry no round, so the round-order rule
applies to uploads only. An outbox holding a deletion is refused by fleetmind versions from
before deletions (as "not a valid outbox record"), never misread.

The ledger: an entry per round that published (`RoundRecord`) or ended without a version.
Each records what the round did to privacy and to the model: cohort size, dropouts, clip
norm, noise, epsilon spent by the round and in total, whether the sum was securely
aggregated, the privacy units the sum held and the server step the merge applied, and the
sha256 of the version's manifest (which lists the sha256 of every file of the version). A
round that ended without a version gets an entry too (`StoppedRound`, its body marked
`"kind": "round_stopped"`): its unmasked sum refused by the aggregate checks or not
mergeable, the protocol aborted (too few sites or shares), or the aggregator restarted
mid-round; which round, which phase, why, the numbers, the epsilon it spent, the receipts
of the vectors it received and the sites it quarantined, so an auditor sees every round a
site's upload entered, and privacy spent without a version. Entries from before it have
no "kind" and verify unchanged. Between consecutive entries rounds increase, versions
never go back and epsilon spent never comes back (`ledger_order_problem`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetmind.aggregation import chain
from fleetmind.aggregation.chain import ChainEntry, ChainError
from fleetmind.aggregation.dp import check_privacy_unit
from fleetmind.aggregation.manifest import canonical_json
from fleetmind.aggregation.merge import cohort_step
from fleetmind.aggregation.participation import (
    MAX_UNIT_ID_CHARS,
    ParticipationCap,
    ParticipationRecord,
)
from fleetmind.aggregation.secagg.messages import DropReason

__all__ = ["CHECKS", "DROP_REASONS", "FORGET_KIND", "LEDGER_DOMAIN", "NOISE_MODES",
           "OUTBOX_DOMAIN", "SCRUB_KINDS", "STOPPED_KIND", "STOP_OUTCOMES", "ForgetRecord",
           "LedgerEntry", "LedgerError", "LedgerRecord", "OutboxEntry", "OutboxError",
           "OutboxRecord", "RoundRecord", "StoppedRound", "ledger_order_problem",
           "parse_ledger_body", "parse_outbox_body", "participation_records",
           "payload_sha256", "user_hmac", "verify_ledger", "verify_outbox"]

OUTBOX_DOMAIN = b"fleetmind/outbox/v1"
LEDGER_DOMAIN = b"fleetmind/ledger/v1"
NOISE_MODES = ("none", "distributed", "central", "local")
FORGET_KIND = "forget"  # the `kind` of a deletion record's body (uploads have none)
# What an upload record counts of the scrubber's work, in order: the fields of the
# scrubber's report (client/scrub.py ScrubReport, KINDS; tests/unit/test_outbox.py keeps
# them equal). Every kind is written, 0 included.
SCRUB_KINDS = ("email", "phone", "card", "national_id", "api_key", "ip")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A session id is a handle, not content: no whitespace, so a sentence pasted in by mistake
# (or a session's text) is refused rather than written into a log that leaves the site's
# control once shared with an auditor. At most MAX_UNIT_ID_CHARS, as the session store's ids.
_SESSION_ID = re.compile(r"\S+")
_NORM_SLACK = 1e-6  # clipping in float32 can land a hair above the float64 norm it scaled


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _whole(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")
    return value


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


# ---- the site's outbox -----------------------------------------------------------------


class OutboxError(ChainError):
    """The outbox chain is broken at `index` (its position in the sequence checked), or an
    append was refused (index None)."""

    label = "outbox entry"


def payload_sha256(payload: bytes) -> str:
    """The hex sha256 an outbox record names: of exactly the bytes that will be sent."""
    return hashlib.sha256(payload).hexdigest()


def _session_ids(value: object) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"session_ids={value!r:.60}: pass a sequence of session ids")
    ids = []
    for item in value:
        if not isinstance(item, str):
            # A Session or a dict carries the conversation itself: only its id may be logged.
            raise ValueError(f"session_ids holds a {type(item).__name__}: pass session.id, "
                             "never the session (its text must not be recorded)")
        if not _SESSION_ID.fullmatch(item) or len(item) > MAX_UNIT_ID_CHARS \
                or not item.isprintable():
            shown = f"{item[:40]!r}{'...' if len(item) > 40 else ''}"
            raise ValueError(f"session_ids holds {shown}, which is not a session id (at most "
                             f"{MAX_UNIT_ID_CHARS} printable characters, no whitespace): "
                             "pass ids, never session text")
        ids.append(item)
    if len(set(ids)) != len(ids):
        raise ValueError("session_ids lists a session twice: each contributes once")
    return tuple(sorted(ids))


def _scrubbed(value: object) -> tuple[tuple[str, int], ...]:
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):  # the scrubber's report (client/scrub.py ScrubReport)
        value = as_dict()
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = dict(value)  # the stored form, pairs of (kind, count)
    if not isinstance(value, Mapping):
        raise ValueError(f"scrubbed={value!r:.60}: pass a ScrubReport or counts by kind")
    unknown = sorted(set(value) - set(SCRUB_KINDS))
    if unknown:
        raise ValueError(f"scrubbed has unknown kinds {unknown}: use {', '.join(SCRUB_KINDS)}")
    return tuple((kind, _whole(f"scrubbed[{kind!r}]", value.get(kind, 0)))
                 for kind in SCRUB_KINDS)


class _Body(Protocol):
    def to_body(self) -> bytes: ...


_Record = TypeVar("_Record", bound=_Body)


def _canonical(record: _Record, body: bytes) -> _Record:
    """`record`, parsed from `body`, if writing it back gives `body` byte for byte: a signed
    body has one spelling, so any other is refused."""
    if record.to_body() != body:
        raise ValueError("body is not in canonical form")
    return record


@dataclass(frozen=True)
class OutboxRecord:
    """What one upload is about to send, validated at construction.

    payload_sha256: hex sha256 of the exact bytes sent (`payload_sha256(payload)`).
    norm_before_clip / norm_after_clip: L2 norm of the (weighted) delta before and after
    clipping, before noise. noise_mode/noise_multiplier: the noise this site adds (or that
    the round's mode implies). session_ids: ids of the contributing sessions (stored
    sorted). scrubbed: the scrubber's counts by kind (a ScrubReport or mapping; stored as
    (kind, count) pairs for every kind). base_version: the global version the delta is
    against. clip_norm / privacy_unit: the bound each unit of the delta was clipped to, and
    the unit (session, user or site). secure_aggregation: False when the payload went
    unmasked (the loopback-only plain-sum ablation). participation: the privacy units this
    upload entered into the round under a participation cap, with each one's count of
    rounds entered (aggregation.participation.ParticipationRecord.to_json(); a
    ParticipationRecord is accepted too); None when no cap was in force. Each is written
    only when set (true, for secure_aggregation), so records from before them read and
    verify unchanged."""

    round_id: int
    payload_sha256: str
    norm_before_clip: float
    norm_after_clip: float
    noise_mode: str
    noise_multiplier: float
    session_ids: tuple[str, ...]
    scrubbed: tuple[tuple[str, int], ...]
    base_version: int
    clip_norm: float | None = None
    privacy_unit: str | None = None
    secure_aggregation: bool = True
    participation: dict[str, Any] | None = None
    created_at_ms: int = field(default_factory=_now_ms)

    def __post_init__(self) -> None:
        for name in ("round_id", "base_version", "created_at_ms"):
            _whole(name, getattr(self, name))
        for name in ("norm_before_clip", "norm_after_clip", "noise_multiplier"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if not isinstance(self.payload_sha256, str) or not _SHA256.fullmatch(self.payload_sha256):
            raise ValueError(f"payload_sha256={self.payload_sha256!r:.80} must be 64 lowercase "
                             "hex (use records.payload_sha256(payload))")
        if self.norm_after_clip > self.norm_before_clip * (1 + _NORM_SLACK) + _NORM_SLACK:
            raise ValueError(f"norm_after_clip={self.norm_after_clip} exceeds "
                             f"norm_before_clip={self.norm_before_clip}: clipping never "
                             "grows an update")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={self.noise_mode!r} must be one of "
                             f"{', '.join(NOISE_MODES)}")
        if self.noise_mode == "none" and self.noise_multiplier != 0:
            raise ValueError(f"noise_mode 'none' with noise_multiplier="
                             f"{self.noise_multiplier}: say which mode adds the noise")
        object.__setattr__(self, "session_ids", _session_ids(self.session_ids))
        object.__setattr__(self, "scrubbed", _scrubbed(self.scrubbed))
        if self.clip_norm is not None:
            object.__setattr__(self, "clip_norm", _finite("clip_norm", self.clip_norm))
        if self.privacy_unit is not None:
            check_privacy_unit(self.privacy_unit)
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"secure_aggregation={self.secure_aggregation!r} must be true or "
                             "false")
        participation = self.participation_record
        if participation is not None:
            object.__setattr__(self, "participation", participation.to_json())

    @property
    def participation_record(self) -> ParticipationRecord | None:
        """The participation record this upload carries (None: no cap was in force)."""
        if self.participation is None:
            return None
        record = (self.participation if isinstance(self.participation, ParticipationRecord)
                  else ParticipationRecord.from_json(self.participation))
        if record.round_id != self.round_id:
            raise ValueError(f"participation is for round {record.round_id}, the upload for "
                             f"round {self.round_id}: a record counts the round it is sent in")
        return record

    @property
    def scrub_counts(self) -> dict[str, int]:
        return dict(self.scrubbed)

    def to_body(self) -> bytes:
        value = {f.name: getattr(self, f.name) for f in fields(self)}
        value["scrubbed"] = dict(self.scrubbed)
        value["session_ids"] = list(self.session_ids)
        for name in ("clip_norm", "privacy_unit", "participation"):
            if value[name] is None:
                del value[name]
        if self.secure_aggregation:
            del value["secure_aggregation"]
        return canonical_json(value)

    @classmethod
    def from_body(cls, body: bytes) -> OutboxRecord:
        raw = json.loads(body)
        if not isinstance(raw, dict):
            raise ValueError("body is not a JSON object")
        return _canonical(cls(**raw), body)


def user_hmac(salt: bytes, user: str) -> str:
    """How a deletion record names an end user: hex HMAC-SHA256 keyed with the site's
    forget salt (client.outbox.forget_salt), of the user id's UTF-8 bytes."""
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"user={user!r}: name the end user (a non-empty id)")
    if not isinstance(salt, bytes) or len(salt) < 16:
        raise ValueError("the forget salt must be at least 16 bytes")
    return hmac.new(salt, user.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ForgetRecord:
    """A deletion at the site (`fleetmind client forget`), validated at construction.

    user_hmac: user_hmac(salt, user id), never the id. salt_sha256: hex sha256 of that
    salt, so whoever is handed a salt can tell it is the one used. session_ids: the
    sessions deleted (stored sorted, at least one: a forget that found nothing records
    nothing). already_consolidated: how many of them a consolidation had already used: the
    deltas computed from them may have been sent (the upload records naming them say which
    rounds), and what a published version learned from them stays in it, bounded only by
    the rounds' differential privacy; deletion cannot recall it."""

    user_hmac: str
    salt_sha256: str
    session_ids: tuple[str, ...]
    already_consolidated: int
    created_at_ms: int = field(default_factory=_now_ms)
    kind: str = FORGET_KIND

    def __post_init__(self) -> None:
        if self.kind != FORGET_KIND:
            raise ValueError(f"kind={self.kind!r}: a deletion record's kind is "
                             f"{FORGET_KIND!r}")
        for name in ("user_hmac", "salt_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _SHA256.fullmatch(value):
                raise ValueError(f"{name}={value!r:.80} must be 64 lowercase hex (a user id "
                                 "is never recorded: use records.user_hmac)")
        object.__setattr__(self, "session_ids", _session_ids(self.session_ids))
        if not self.session_ids:
            raise ValueError("session_ids is empty: a deletion record names the sessions "
                             "it deleted")
        _whole("created_at_ms", self.created_at_ms)
        _whole("already_consolidated", self.already_consolidated)
        if self.already_consolidated > len(self.session_ids):
            raise ValueError(f"already_consolidated={self.already_consolidated} exceeds the "
                             f"{len(self.session_ids)} sessions deleted")

    @classmethod
    def for_user(cls, salt: bytes, user: str, session_ids: Iterable[str],
                 already_consolidated: int, created_at_ms: int | None = None
                 ) -> ForgetRecord:
        """The record of deleting `user`'s `session_ids`, naming the user by its HMAC."""
        return cls(user_hmac(salt, user), hashlib.sha256(salt).hexdigest(),
                   tuple(session_ids), already_consolidated,
                   _now_ms() if created_at_ms is None else created_at_ms)

    def names(self, user: str, salt: bytes) -> bool:
        """Whether this record is the deletion of `user`, given the site's salt (the
        auditor's check). Raises ValueError when `salt` is not the one the record used."""
        if hashlib.sha256(salt).hexdigest() != self.salt_sha256:
            raise ValueError("this is not the salt the deletion was recorded with (its "
                             "sha256 differs from the record's salt_sha256)")
        return hmac.compare_digest(user_hmac(salt, user), self.user_hmac)

    def to_body(self) -> bytes:
        value = {f.name: getattr(self, f.name) for f in fields(self)}
        value["session_ids"] = list(self.session_ids)
        return canonical_json(value)

    @classmethod
    def from_body(cls, body: bytes) -> ForgetRecord:
        raw = json.loads(body)
        if not isinstance(raw, dict) or raw.get("kind") != FORGET_KIND:
            raise ValueError("body is not a deletion record")
        return _canonical(cls(**raw), body)


def parse_outbox_body(body: bytes) -> OutboxRecord | ForgetRecord:
    """An outbox body as its record: a deletion (`"kind": "forget"`) or an upload (no
    kind). Raises ValueError or TypeError for anything else."""
    raw = json.loads(body)
    if isinstance(raw, dict) and "kind" in raw:
        if raw["kind"] != FORGET_KIND:
            raise ValueError(f"unknown record kind {raw['kind']!r:.40}")
        return ForgetRecord.from_body(body)
    return OutboxRecord.from_body(body)


@dataclass(frozen=True)
class OutboxEntry(ChainEntry):
    """One chained, signed outbox entry, as stored: an upload (`record`) or, where
    `is_forget`, a deletion (`forget`)."""

    @property
    def is_forget(self) -> bool:
        """Whether the body says it is a deletion (read from its kind alone; `forget`
        validates it)."""
        try:
            raw = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(raw, dict) and raw.get("kind") == FORGET_KIND

    @property
    def record(self) -> OutboxRecord:
        parsed = parse_outbox_body(self.body)
        if isinstance(parsed, ForgetRecord):
            raise ValueError(f"outbox entry {self.index} is a deletion record, not an "
                             "upload: read entry.forget")
        return parsed

    @property
    def forget(self) -> ForgetRecord:
        return ForgetRecord.from_body(self.body)


def _check_outbox_body(body: bytes, last: OutboxRecord | None) -> OutboxRecord | None:
    """Checks one body; `last` is the last upload before it (None: none yet). Deletions
    belong to no round, so the round order is kept among uploads only."""
    try:
        record = parse_outbox_body(body)
    except (ValueError, TypeError) as error:
        raise ValueError(f"body is not a valid outbox record: {error}") from None
    if isinstance(record, ForgetRecord):
        return last
    if last is not None and record.round_id < last.round_id:
        raise ValueError(f"round {record.round_id} after round {last.round_id}: a site's "
                         "rounds never go back")
    return record


def verify_outbox(entries: Iterable[ChainEntry], public_key: Ed25519PublicKey | bytes,
                  expected_head: bytes | None = None) -> bytes:
    """Checks every outbox entry in order against the site's public key and returns the
    head hash (GENESIS_HASH when empty). Raises OutboxError naming the first entry that is
    out of place, altered, unsigned or not a valid record. `expected_head`, a head kept from
    an earlier check, reveals entries cut off the end."""
    return chain.verify_chain(entries, public_key, domain=OUTBOX_DOMAIN,
                              expected_head=expected_head, check=_check_outbox_body,
                              signer="the site's identity key", error=OutboxError)


def participation_records(records: Iterable[OutboxRecord]) -> list[ParticipationRecord]:
    """The participation records the outbox `records` carry, in order (records without
    one, written with no cap in force or before caps existed, are skipped): the input of
    aggregation.participation.participation_history, so a site's counts survive restarts
    and an auditor can recount them."""
    return [p for p in (record.participation_record for record in records) if p is not None]


# ---- the aggregator's ledger -------------------------------------------------------------


class LedgerError(ChainError):
    """The chain is broken at `index` (its position in the sequence checked), or an append
    was refused (index None)."""

    label = "ledger entry"


def _receipts(hashes: object) -> tuple[str, ...]:
    if not isinstance(hashes, list | tuple) or not all(
            isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes):
        raise ValueError("payload_sha256s must be a list of 64-hex-digit sha256 digests")
    if list(hashes) != sorted(set(hashes)):
        raise ValueError("payload_sha256s must be sorted and distinct")
    return tuple(hashes)


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
    entry from before it) read and verify unchanged.
    units and server_step: the privacy units the round's sum held (each contributor's
    contributing_units, declared at join, summed; at least one per site) and the server
    step the merge applied to the mean delta (aggregation.merge.cohort_step of the
    configured rate and units), so an auditor can tell how far the round moved the model.
    Recorded together; entries from before them have neither, and read and verify
    unchanged. server_learning_rate and server_step_units: the rule that gave the step
    (privacy.server_learning_rate, and R of cohort_step: None, every round steps the rate),
    so an auditor recomputes it from the entry alone; an entry whose step is not what its
    rule gives is refused. Written with units and server_step; entries from before the rule
    was recorded have neither, and their step is taken as written."""

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
    units: int | None = None
    server_step: float | None = None
    server_learning_rate: float | None = None
    server_step_units: int | None = None
    recorded_at_ms: int = field(default_factory=_now_ms)

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
        self._check_step()
        self._check_step_rule()

    def _check_step(self) -> None:
        """units and server_step: both or neither, units a whole number no smaller than the
        cohort (every site in the sum declared at least one), the step finite and > 0."""
        if (self.units is None) != (self.server_step is None):
            raise ValueError(f"units={self.units!r}, server_step={self.server_step!r}: a "
                             "round records both (the step follows from the units) or neither")
        if self.units is None:
            return
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise ValueError(f"units={self.units!r} must be an integer >= 1")
        if self.units < self.cohort_size:
            raise ValueError(f"units={self.units} is below cohort_size={self.cohort_size}: "
                             "every site in the sum declared at least one privacy unit")
        step = _finite("server_step", self.server_step)
        if step <= 0:
            raise ValueError(f"server_step={step} must be > 0")
        object.__setattr__(self, "server_step", step)

    def _check_step_rule(self) -> None:
        """server_learning_rate > 0 and finite, server_step_units (R) a whole number >= 1
        or None, and server_step what cohort_step gives for them and the round's units."""
        rate, reference = self.server_learning_rate, self.server_step_units
        if rate is None:
            if reference is not None:
                raise ValueError(f"server_step_units={reference!r} without "
                                 "server_learning_rate: a rule records its rate")
            return
        if self.units is None or self.server_step is None:
            raise ValueError("server_learning_rate without units and server_step: the rule "
                             "is recorded with the step it gave")
        rate = _finite("server_learning_rate", rate)
        if rate <= 0:
            raise ValueError(f"server_learning_rate={rate} must be > 0")
        if reference is not None and (isinstance(reference, bool)
                                      or not isinstance(reference, int) or reference < 1):
            raise ValueError(f"server_step_units={reference!r} must be an integer >= 1 or "
                             "absent (every round steps the rate)")
        expected = cohort_step(rate, self.units, reference)
        if not math.isclose(self.server_step, expected, rel_tol=1e-12):
            rule = f"{rate:g}" if reference is None or self.units <= reference else \
                f"{rate:g} x {reference} / {self.units}"
            raise ValueError(f"server_step={self.server_step!r} is not the step its rule "
                             f"gives ({rule} = {expected!r}): the entry's step and rule "
                             "disagree")
        object.__setattr__(self, "server_learning_rate", rate)

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
        if self.units is None:  # entries from before the step was recorded
            del body["units"], body["server_step"]
        if self.server_learning_rate is None:  # entries from before the rule was recorded
            del body["server_learning_rate"]
        if self.server_step_units is None:  # the rate every round, or no rule recorded
            del body["server_step_units"]
        return canonical_json(body)

    @classmethod
    def from_body(cls, body: bytes) -> RoundRecord:
        return _canonical(cls(**json.loads(body)), body)


STOPPED_KIND = "round_stopped"  # the "kind" of a StoppedRound's body
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
    kind: str = STOPPED_KIND
    recorded_at_ms: int = field(default_factory=_now_ms)

    def __post_init__(self) -> None:
        if self.kind != STOPPED_KIND:
            raise ValueError(f"kind={self.kind!r} must be {STOPPED_KIND!r}")
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
        return _canonical(cls(**json.loads(body)), body)


LedgerRecord = RoundRecord | StoppedRound


def parse_ledger_body(body: bytes) -> LedgerRecord:
    """A ledger entry's record: a StoppedRound when its body says so, else a RoundRecord
    (every entry from before stopped rounds were recorded)."""
    raw = json.loads(body)
    if isinstance(raw, dict) and "kind" in raw:
        return StoppedRound.from_body(body)
    return RoundRecord.from_body(body)


def ledger_order_problem(record: LedgerRecord, last: LedgerRecord) -> str | None:
    """Why `record` may not follow `last` in the ledger (None: it may): rounds increase; a
    published round's version is above every earlier one, a stopped round's is the latest
    then (it published nothing); epsilon spent never comes back."""
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


@dataclass(frozen=True)
class LedgerEntry(ChainEntry):
    """One chained, signed ledger entry, as stored and as Audit.StreamLedger carries it."""

    @property
    def record(self) -> LedgerRecord:
        return parse_ledger_body(self.body)


def _check_ledger_body(body: bytes, last: LedgerRecord | None) -> LedgerRecord:
    """What must hold between consecutive rounds, on top of the chain itself."""
    try:
        record = parse_ledger_body(body)
    except (ValueError, TypeError) as error:
        raise ValueError(f"body is not a valid round record: {error}") from None
    problem = None if last is None else ledger_order_problem(record, last)
    if problem is not None:
        raise ValueError(problem)
    return record


def verify_ledger(entries: Iterable[ChainEntry], public_key: Ed25519PublicKey | bytes,
                  expected_head: bytes | None = None) -> bytes:
    """Checks every ledger entry in order and returns the head hash (GENESIS_HASH when
    empty). Raises LedgerError naming the first entry that is out of place, altered,
    unsigned, or inconsistent with the ones before it. With `expected_head` (a head hash
    the auditor kept from an earlier check), a chain that no longer contains it was cut
    short."""
    return chain.verify_chain(entries, public_key, domain=LEDGER_DOMAIN,
                              expected_head=expected_head, check=_check_ledger_body,
                              signer="the aggregator key", error=LedgerError)
