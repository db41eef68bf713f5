"""`audit outbox`'s report: what left a site, each upload matched to its publication in
the aggregator's signed records (the site's downloaded versions, the ledger and its
receipts), and the deletions the site recorded (`fleetmind client forget`), as one JSON-able
document (the CLI prints it or tables it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmind.aggregation.chain import ChainEntry
from fleetmind.aggregation.participation import participation_history
from fleetmind.aggregation.records import ForgetRecord, OutboxRecord, StoppedRound
from fleetmind.audit import trail
from fleetmind.audit.ledger_report import when

__all__ = ["SHORT", "OutboxReport", "audit_entries", "deletion_row", "outbox_report"]

SHORT = 12  # hex digits of a hash shown in a message or table; JSON carries the whole hash


@dataclass(frozen=True)
class OutboxReport:
    """What `audit outbox` found. `checked`: publications were looked up (an aggregator
    key was given); `problems`: what is wrong beyond the chain (a ledger that does not
    verify, a payload the aggregator's receipts do not name, participation counts that do
    not add up); `participation`: each privacy unit's count of rounds entered, recounted
    from the verified records (units of uploads under no cap are not counted); `rows`: the
    verified uploads; `deletions`: the verified deletion records, each with the rounds
    whose uploads (verified, before it) already named one of its sessions."""

    path: Path
    audit: trail.ChainAudit
    rows: list[dict[str, Any]]
    problems: list[str]
    checked: bool
    participation: dict[str, int] = field(default_factory=dict)
    deletions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.audit.ok and not self.problems

    @property
    def error(self) -> str:
        return "; ".join(([str(self.audit.error)] if self.audit.error is not None else [])
                         + self.problems)

    def as_json(self) -> dict[str, Any]:
        audit = self.audit
        return {"ok": self.ok, "outbox": str(self.path), "entries": audit.read,
                "verified": len(audit.verified), "head": audit.head.hex(),
                "bad_entry": None if audit.error is None else audit.error.index,
                "error": self.error or None, "publications_checked": self.checked,
                "receipts_checked": any(r["receipt_matched"] is not None for r in self.rows),
                "participation_counts": self.participation, "records": self.rows,
                "deletions": self.deletions}


def audit_entries(entries: list[ChainEntry], site_key: bytes,
                  expected_head: bytes | None = None
                  ) -> trail.ChainAudit[OutboxRecord | ForgetRecord]:
    """The outbox's chain against the site's key, each verified entry read as an upload or
    a deletion record."""
    return trail.audit_outbox(entries, site_key, expected_head)


def _stopped(entry: StoppedRound | None, payload_sha256: str) -> dict[str, Any] | None:
    """How the ledger says an upload's round ended without a version (None: it did not say
    so); receipt_listed: whether the entry lists this payload among what it received or
    summed (None: it lists none, as a round abandoned at a restart)."""
    if entry is None:
        return None
    return {"outcome": entry.outcome, "phase": entry.phase, "check": entry.check,
            "drop_reason": entry.drop_reason, "epsilon_round": entry.epsilon_round,
            "receipt_listed": (payload_sha256 in entry.payload_sha256s
                               if entry.payload_sha256s else None)}


def deletion_row(entry: ChainEntry, record: ForgetRecord,
                 sent: dict[str, list[int]]) -> dict[str, Any]:
    """One deletion as the report shows it; `sent`: session id -> the rounds whose
    uploads named it before this deletion."""
    rounds = sorted({r for s in record.session_ids for r in sent.get(s, ())})
    return {"entry": entry.index, "deleted_at": when(record.created_at_ms),
            "user_hmac": record.user_hmac, "salt_sha256": record.salt_sha256,
            "sessions": len(record.session_ids), "session_ids": list(record.session_ids),
            "already_consolidated": record.already_consolidated,
            "sent_in_rounds": rounds, "entry_hash": entry.hash.hex()}


def outbox_report(path: Path, entries: list[ChainEntry], site_key: bytes, *,
                  expected_head: bytes | None = None, site_dir: Path | None = None,
                  aggregator_key: bytes | None = None,
                  ledger_entries: list[ChainEntry] | None = None) -> OutboxReport:
    """Verifies the outbox `entries` (read from `path`) against the site's key. With the
    aggregator's key, each record's round is looked up among the versions in `site_dir`
    and the verified `ledger_entries`, and its payload among the ledger's receipts."""
    audit = audit_entries(entries, site_key, expected_head)
    # Where each round's publication can be read, each source signed by the aggregator.
    published: dict[int, trail.Publication] = {}
    stopped: dict[int, StoppedRound] = {}  # rounds the ledger says ended without a version
    problems: list[str] = []
    if aggregator_key is not None:
        if site_dir is not None:
            published.update(trail.site_publications(site_dir, aggregator_key))
        if ledger_entries is not None:
            ledger_audit = trail.audit_ledger(ledger_entries, aggregator_key)
            if not ledger_audit.ok:
                problems.append(f"the ledger does not verify: {ledger_audit.error}")
            published.update(trail.publications(ledger_audit))
            stopped.update(trail.stopped_rounds(ledger_audit))
    rows = []
    deletions = []
    sent: dict[str, list[int]] = {}  # session id -> rounds whose uploads named it
    uploads: list[OutboxRecord] = []
    for entry, record in audit.verified:
        if isinstance(record, ForgetRecord):
            deletions.append(deletion_row(entry, record, sent))
            continue
        uploads.append(record)
        for session_id in record.session_ids:
            sent.setdefault(session_id, []).append(record.round_id)
        publication = published.get(record.round_id)
        # The ledger's receipts prove what the aggregator summed; a version folder does not.
        receipt = (record.payload_sha256 in publication.receipts
                   if publication is not None and publication.receipts else None)
        if receipt is False:
            problems.append(f"entry {entry.index}: round {record.round_id}'s payload "
                            f"{record.payload_sha256[:SHORT]} is not among the aggregator's "
                            "receipts in the ledger: it is not what was summed")
        rows.append({
            "entry": entry.index, "sent_at": when(record.created_at_ms),
            "round": record.round_id, "base_version": record.base_version,
            "payload_sha256": record.payload_sha256,
            "norm_before_clip": record.norm_before_clip,
            "norm_after_clip": record.norm_after_clip, "clip_norm": record.clip_norm,
            "privacy_unit": record.privacy_unit, "noise_mode": record.noise_mode,
            "noise_multiplier": record.noise_multiplier,
            "secure_aggregation": record.secure_aggregation,
            "session_ids": list(record.session_ids), "scrubbed": record.scrub_counts,
            "participation_cap": None if record.participation is None
            else record.participation["max_rounds"],
            "participation": None if record.participation is None
            else dict(record.participation["counts"]),
            "receipt_matched": receipt,
            "published": None if publication is None else {
                "version": publication.version, "cohort_size": publication.cohort_size,
                "source": publication.source},
            "stopped": _stopped(stopped.get(record.round_id), record.payload_sha256),
            "entry_hash": entry.hash.hex()})
    counts: dict[str, int] = {}
    try:
        history = participation_history(
            p for p in (record.participation_record for record in uploads) if p is not None)
        counts = {unit: len(rounds) for unit, rounds in sorted(history.items())}
    except ValueError as error:
        problems.append(f"participation counts: {error}")
    return OutboxReport(Path(path), audit, rows, problems, aggregator_key is not None, counts,
                        deletions)
