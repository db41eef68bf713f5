"""The site's outbox: before any byte of an update leaves, the site records what it is about
to send. One entry per upload: round, sha256 of the payload, the update's L2 norm before
and after clipping, the noise it carries, the ids (never the text) of the sessions that
contributed, what the scrubber removed (counts by kind), the version it was computed
against, and when.

The log is append-only, hash-chained and signed by the site's identity key
(fleetmind.aggregation.chain, with the outbox's own domain so an outbox entry never
verifies as a ledger entry or the other way round). The site's operator, or an auditor
holding the site's public key, can check it (`Outbox.verify` / `verify_chain`) and compare
payload hashes with what the aggregator says it received.

Storage is fleetmind.runtime.signed_log's (SQLite, WAL, synchronous=FULL): a record that
`append` returned survives a power cut, so a payload is never sent without its record on
disk. Triggers refuse UPDATE and DELETE; the chain and signatures catch edits made by
other means. This module holds the record, its rules, and the schema.

Deletions: `fleetmind client forget` appends a ForgetRecord to the same chain (a body with
`"kind": "forget"`; an upload body has no `kind`, so every upload record, old or new, keeps
its bytes). It names the user only as HMAC-SHA256(site salt, user id): the salt is 32
random bytes kept with the site (`FORGET_SALT_FILE` in its data folder, never in the log;
the record carries its sha256), which the operator hands an auditor on request, who then
recomputes the HMAC from the user id (`ForgetRecord.names`). A plain sha256 of the id would
be guessable from a list of emails; a hash keyed with a site secret that is never shared
could not be checked by anyone. Deletions carry no round: the table's (unsigned) round_id
column holds FORGET_ROUND (-1) for them, so the schema is unchanged, `for_round` never
returns them, and the round-order rule applies to uploads only. `Outbox.entries()` and
iteration give the upload entries, which is what everything that sends or counts reads;
`chain()` gives every entry and `deletions()` the deletion records. An outbox holding a
deletion is refused by fleetmind versions from before deletions (as "not a valid outbox
record"), never misread.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fleetmind.aggregation import chain
from fleetmind.aggregation.chain import GENESIS_HASH, ChainEntry, ChainError
from fleetmind.aggregation.dp import check_privacy_unit
from fleetmind.aggregation.participation import ParticipationRecord
from fleetmind.client.scrub import KINDS, ScrubReport
from fleetmind.client.store import MAX_ID_CHARS
from fleetmind.runtime.durable import atomic_write
from fleetmind.runtime.signed_log import COLUMNS, SignedLog, canonical_json

__all__ = ["DOMAIN", "FORGET_KIND", "FORGET_ROUND", "FORGET_SALT_FILE", "GENESIS_HASH",
           "NOISE_MODES", "OUTBOX_FILE", "ForgetRecord", "Outbox", "OutboxEntry",
           "OutboxError", "OutboxRecord", "forget_salt", "parse_body",
           "participation_records", "payload_sha256", "user_hmac", "verify_chain"]

DOMAIN = b"fleetmind/outbox/v1"
OUTBOX_FILE = "outbox.sqlite"  # in the site's data folder
NOISE_MODES = ("none", "distributed", "central", "local")
FORGET_KIND = "forget"  # the `kind` of a deletion record's body (uploads have none)
FORGET_ROUND = -1  # the round_id column of a deletion's row: it belongs to no round
FORGET_SALT_FILE = "forget.salt"  # in the site's data folder: the key of user_hmac
_SALT_BYTES = 32
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A session id is a handle, not content: no whitespace, so a sentence pasted in by mistake
# (or a session's text) is refused rather than written into a log that leaves the site's
# control once shared with an auditor.
_SESSION_ID = re.compile(r"\S+")
_NORM_SLACK = 1e-6  # clipping in float32 can land a hair above the float64 norm it scaled

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


class OutboxError(ChainError):
    """The outbox chain is broken at `index` (its position in the sequence checked), or an
    append was refused (index None)."""

    label = "outbox entry"


def payload_sha256(payload: bytes) -> str:
    """The hex sha256 an outbox record names: of exactly the bytes that will be sent."""
    return hashlib.sha256(payload).hexdigest()


def _whole(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")
    return value


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return float(value)


def _session_ids(value: object) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"session_ids={value!r:.60}: pass a sequence of session ids")
    ids = []
    for item in value:
        if not isinstance(item, str):
            # A Session or a dict carries the conversation itself: only its id may be logged.
            raise ValueError(f"session_ids holds a {type(item).__name__}: pass session.id, "
                             "never the session (its text must not be recorded)")
        if not _SESSION_ID.fullmatch(item) or len(item) > MAX_ID_CHARS \
                or not item.isprintable():
            shown = f"{item[:40]!r}{'...' if len(item) > 40 else ''}"
            raise ValueError(f"session_ids holds {shown}, which is not a session id (at most "
                             f"{MAX_ID_CHARS} printable characters, no whitespace): pass ids, "
                             "never session text")
        ids.append(item)
    if len(set(ids)) != len(ids):
        raise ValueError("session_ids lists a session twice: each contributes once")
    return tuple(sorted(ids))


def _scrubbed(value: object) -> tuple[tuple[str, int], ...]:
    if isinstance(value, ScrubReport):
        value = value.as_dict()
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = dict(value)  # the stored form, pairs of (kind, count)
    if not isinstance(value, Mapping):
        raise ValueError(f"scrubbed={value!r:.60}: pass a ScrubReport or counts by kind")
    unknown = sorted(set(value) - set(KINDS))
    if unknown:
        raise ValueError(f"scrubbed has unknown kinds {unknown}: use {', '.join(KINDS)}")
    return tuple((kind, _whole(f"scrubbed[{kind!r}]", value.get(kind, 0))) for kind in KINDS)


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
    participation: dict | None = None
    created_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    def __post_init__(self) -> None:
        for name in ("round_id", "base_version", "created_at_ms"):
            _whole(name, getattr(self, name))
        for name in ("norm_before_clip", "norm_after_clip", "noise_multiplier"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        if not isinstance(self.payload_sha256, str) or not _SHA256.fullmatch(self.payload_sha256):
            raise ValueError(f"payload_sha256={self.payload_sha256!r:.80} must be 64 lowercase "
                             "hex (use outbox.payload_sha256(payload))")
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
        record = cls(**raw)
        if record.to_body() != body:
            raise ValueError("body is not in canonical form")
        return record


def user_hmac(salt: bytes, user: str) -> str:
    """How a deletion record names an end user: hex HMAC-SHA256 keyed with the site's
    forget salt (forget_salt), of the user id's UTF-8 bytes."""
    if not isinstance(user, str) or not user.strip():
        raise ValueError(f"user={user!r}: name the end user (a non-empty id)")
    if not isinstance(salt, bytes) or len(salt) < 16:
        raise ValueError("the forget salt must be at least 16 bytes")
    return hmac.new(salt, user.encode(), hashlib.sha256).hexdigest()


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
    created_at_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    kind: str = FORGET_KIND

    def __post_init__(self) -> None:
        if self.kind != FORGET_KIND:
            raise ValueError(f"kind={self.kind!r}: a deletion record's kind is "
                             f"{FORGET_KIND!r}")
        for name in ("user_hmac", "salt_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _SHA256.fullmatch(value):
                raise ValueError(f"{name}={value!r:.80} must be 64 lowercase hex (a user id "
                                 "is never recorded: use outbox.user_hmac)")
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
                   time.time_ns() // 1_000_000 if created_at_ms is None else created_at_ms)

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
        record = cls(**raw)
        if record.to_body() != body:
            raise ValueError("body is not in canonical form")
        return record


def parse_body(body: bytes) -> OutboxRecord | ForgetRecord:
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
        parsed = parse_body(self.body)
        if isinstance(parsed, ForgetRecord):
            raise ValueError(f"outbox entry {self.index} is a deletion record, not an "
                             "upload: read entry.forget")
        return parsed

    @property
    def forget(self) -> ForgetRecord:
        return ForgetRecord.from_body(self.body)


def _check_record(body: bytes, last: OutboxRecord | None) -> OutboxRecord | None:
    """Checks one body; `last` is the last upload before it (None: none yet). Deletions
    belong to no round, so the round order is kept among uploads only."""
    try:
        record = parse_body(body)
    except (ValueError, TypeError) as error:
        raise ValueError(f"body is not a valid outbox record: {error}") from None
    if isinstance(record, ForgetRecord):
        return last
    if last is not None and record.round_id < last.round_id:
        raise ValueError(f"round {record.round_id} after round {last.round_id}: a site's "
                         "rounds never go back")
    return record


def verify_chain(entries: Iterable[ChainEntry], public_key: Ed25519PublicKey | bytes,
                 expected_head: bytes | None = None) -> bytes:
    """Checks every entry in order against the site's public key and returns the head hash
    (GENESIS_HASH when empty). Raises OutboxError naming the first entry that is out of
    place, altered, unsigned or not a valid record. `expected_head`, a head kept from an
    earlier check, reveals entries cut off the end."""
    return chain.verify_chain(entries, public_key, domain=DOMAIN, expected_head=expected_head,
                              check=_check_record, signer="the site's identity key",
                              error=OutboxError)


class Outbox(SignedLog[OutboxEntry]):
    """The outbox file of one site (`OUTBOX_FILE` in its data folder), signed with the
    site's identity key. Safe to use from several threads of the site process."""

    DOMAIN = DOMAIN
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
        return verify_chain(self.chain(), self.public_key, expected_head)

    def participation_records(self) -> list[ParticipationRecord]:
        """The participation records of every entry, oldest first (see
        participation_records)."""
        return participation_records(entry.record for entry in self.entries())


def participation_records(records: Iterable[OutboxRecord]) -> list[ParticipationRecord]:
    """The participation records the outbox `records` carry, in order (records without
    one, written with no cap in force or before caps existed, are skipped): the input of
    aggregation.participation.participation_history, so a site's counts survive restarts
    and an auditor can recount them."""
    return [p for p in (record.participation_record for record in records) if p is not None]
