"""Checking the two signed logs: the aggregator's ledger and a site's outbox.

The chain rules are fleetmind.aggregation.records' (`verify_ledger`, `verify_outbox`), the
rules the aggregator and the site append under, with no code of either side; this module
runs them over what the auditor read and keeps what an auditor reports: the entries that
verified, in order, and the first bad one, if any. Everything before the first bad entry
is still shown, since a break at round 40 says nothing against rounds 0..39.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from fleetmind.aggregation.chain import GENESIS_HASH, ChainEntry, ChainError
from fleetmind.aggregation.manifest import MANIFEST, Manifest, VersionError
from fleetmind.aggregation.records import (
    ForgetRecord,
    LedgerRecord,
    OutboxRecord,
    RoundRecord,
    StoppedRound,
    parse_ledger_body,
    parse_outbox_body,
    verify_ledger,
    verify_outbox,
)
from fleetmind.runtime.layout import VERSIONS, verify_folder

__all__ = ["ChainAudit", "Publication", "VersionAudit", "audit_ledger", "audit_outbox",
           "audit_version", "publications", "site_publications", "stopped_rounds"]

R = TypeVar("R")


@dataclass(frozen=True)
class ChainAudit(Generic[R]):
    """What verifying one log found. `verified`: (entry, its record) for every entry before
    the first bad one; `error`: that entry's problem (None: the whole log verified);
    `head`: hash of the last verified entry (32 zero bytes when none); `read`: entries
    read in all."""

    verified: tuple[tuple[ChainEntry, R], ...]
    head: bytes
    error: ChainError | None
    read: int

    @property
    def ok(self) -> bool:
        return self.error is None


def _audit(entries: Sequence[ChainEntry], verify: Callable[..., bytes],
           parse: Callable[[bytes], R], key: bytes, expected_head: bytes | None
           ) -> ChainAudit[R]:
    entries = list(entries)
    try:
        verify(entries, key, expected_head)
        error, good = None, entries
    except ChainError as problem:
        # index None: every entry verified but the kept head is not among them (cut off).
        error = problem
        good = entries if problem.index is None else entries[:problem.index]
    head = good[-1].hash if good else GENESIS_HASH
    return ChainAudit(tuple((entry, parse(entry.body)) for entry in good), head, error,
                      len(entries))


def audit_ledger(entries: Sequence[ChainEntry], aggregator_key: bytes,
                 expected_head: bytes | None = None) -> ChainAudit[LedgerRecord]:
    """The ledger against the aggregator's public key (hash chain, signatures, and what
    must hold between rounds: rounds, versions and epsilon never go back); each verified
    entry read as a published round or a round stopped without a version."""
    return _audit(entries, verify_ledger, parse_ledger_body, aggregator_key, expected_head)


def audit_outbox(entries: Sequence[ChainEntry], site_key: bytes,
                 expected_head: bytes | None = None
                 ) -> ChainAudit[OutboxRecord | ForgetRecord]:
    """A site's outbox against the site's identity (public) key; each verified entry read
    as an upload or a deletion record."""
    return _audit(entries, verify_outbox, parse_outbox_body, site_key, expected_head)


@dataclass(frozen=True)
class Publication:
    """A round the aggregator published, as a signed source says: `source` is "ledger"
    (a verified ledger entry) or "version" (a verified version folder's manifest).
    `receipts`: the masked vectors' sha256 the aggregator summed (ledger entries only)."""

    round_id: int
    version: int
    cohort_size: int
    source: str
    receipts: tuple[str, ...] = ()


def publications(verified: ChainAudit[LedgerRecord]) -> dict[int, Publication]:
    """Round id -> its publication, from the ledger entries that verified (a stopped
    round published nothing)."""
    return {record.round_id: Publication(record.round_id, record.version, record.cohort_size,
                                         "ledger", record.payload_sha256s)
            for _, record in verified.verified if isinstance(record, RoundRecord)}


def stopped_rounds(verified: ChainAudit[LedgerRecord]) -> dict[int, StoppedRound]:
    """Round id -> its entry, for the rounds the verified ledger says ended without a
    version (rejected, not mergeable, aborted, abandoned)."""
    return {record.round_id: record for _, record in verified.verified
            if isinstance(record, StoppedRound)}


def site_publications(site_dir: Path, aggregator_key: bytes) -> dict[int, Publication]:
    """Round id -> its publication, from the versions the site downloaded and that still
    verify with the aggregator key (an unverifiable folder proves nothing, so it is
    skipped here; `fleetmind audit version` says what is wrong with it)."""
    found: dict[int, Publication] = {}
    folder = Path(site_dir) / VERSIONS
    if not folder.is_dir():
        return found
    for version in sorted(folder.iterdir()):
        if not (version / MANIFEST).is_file():
            continue  # a partial download, swept by the site at its next start
        try:
            manifest = verify_folder(version, aggregator_key)
        except (VersionError, OSError):
            continue
        if manifest.round_id is not None:
            found[manifest.round_id] = Publication(manifest.round_id, manifest.version,
                                                   manifest.cohort_size, "version")
    return found


def manifest_sha256(folder: Path) -> str:
    """The version hash the ledger records for a version: sha256 of its manifest.json."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()


def ledger_disagreements(manifest: Manifest, version_hash: str, record: RoundRecord
                         ) -> list[str]:
    """How a verified version's manifest and the ledger's entry for it differ (empty: they
    agree). The ledger signs the manifest's sha256, so any difference is a forgery or a
    version published outside the ledger."""
    expected: Mapping[str, tuple[object, object]] = {
        "version_hash": (version_hash, record.version_hash),
        "round_id": (manifest.round_id, record.round_id),
        "cohort_size": (manifest.cohort_size, record.cohort_size),
        "clip_norm": (manifest.clip_norm, record.clip_norm),
        "noise_multiplier": (manifest.noise_multiplier, record.noise_multiplier),
        "noise_mode": (manifest.noise_mode, record.noise_mode),
        "epsilon (total)": (manifest.epsilon, record.epsilon_total),
        "delta": (manifest.delta, record.delta),
        "secure_aggregation": (manifest.secure_aggregation, record.secure_aggregation),
    }
    return [f"{name}: manifest {mine!r}, ledger {theirs!r}"
            for name, (mine, theirs) in expected.items() if mine != theirs]


@dataclass(frozen=True)
class VersionAudit:
    """What checking one version folder found. `manifest` is None when it did not verify
    (`error` says why); `ledger_entry`: the index of the ledger entry that records this
    version (None: no ledger given, or genesis, which no round made); `disagreements`:
    how that entry and the manifest differ."""

    folder: Path
    manifest: Manifest | None
    version_hash: str | None
    error: str | None
    ledger_entry: int | None = None
    disagreements: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None and not self.disagreements


def audit_version(folder: Path, aggregator_key: bytes,
                  verified_ledger: ChainAudit[LedgerRecord] | None = None
                  ) -> VersionAudit:
    """Signature and file hashes of a version folder (runtime.layout.verify_folder, the
    check every site makes before activating), and, given a verified ledger, that the
    ledger records this exact manifest for the version."""
    folder = Path(folder)
    try:
        manifest = verify_folder(folder, aggregator_key)
    except VersionError as error:
        return VersionAudit(folder, None, None, str(error))
    version_hash = manifest_sha256(folder)
    if verified_ledger is None or manifest.round_id is None:
        return VersionAudit(folder, manifest, version_hash, None)
    for entry, record in verified_ledger.verified:
        if isinstance(record, RoundRecord) and record.version == manifest.version:
            return VersionAudit(folder, manifest, version_hash, None, entry.index,
                                tuple(ledger_disagreements(manifest, version_hash, record)))
    where = "the ledger" if verified_ledger.ok else "the ledger's entries before its break"
    return VersionAudit(folder, manifest, version_hash, None, None, (
        f"version {manifest.version} (round {manifest.round_id}) is not in {where}: it was "
        "published without a ledger entry, or the ledger was cut short",))
