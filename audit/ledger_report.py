"""`audit ledger`'s report: the ledger's verified rounds, what they spent, and where the
chain broke, as one JSON-able document (the CLI prints it or tables it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetmind.aggregation.chain import ChainEntry
from fleetmind.audit import trail

__all__ = ["LedgerReport", "ledger_report", "ledger_rows", "when"]


def when(ms: int) -> str:
    """A record's millisecond timestamp as UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def ledger_rows(audit: trail.ChainAudit) -> list[dict[str, Any]]:
    """One row per verified ledger entry: the round's privacy and what it published."""
    return [{"entry": entry.index, "round": record.round_id, "version": record.version,
             "cohort_size": record.cohort_size, "dropouts": record.dropouts,
             "clip_norm": record.clip_norm, "privacy_unit": record.privacy_unit,
             "noise_mode": record.noise_mode, "noise_multiplier": record.noise_multiplier,
             "epsilon_round": record.epsilon_round, "epsilon_total": record.epsilon_total,
             "delta": record.delta, "secure_aggregation": record.secure_aggregation,
             "version_hash": record.version_hash, "recorded_at": when(record.recorded_at_ms),
             "entry_hash": entry.hash.hex()}
            for entry, record in audit.verified]


@dataclass(frozen=True)
class LedgerReport:
    """What `audit ledger` found in the ledger read from `source`. `budget`: the
    aggregator's unsigned word on its budget (None: read from a file, or not answered)."""

    audit: trail.ChainAudit
    rows: list[dict[str, Any]]
    source: str
    budget: dict | None

    @property
    def ok(self) -> bool:
        return self.audit.ok

    def as_json(self) -> dict[str, Any]:
        audit = self.audit
        return {"ok": audit.ok, "source": self.source, "entries": audit.read,
                "verified": len(self.rows), "head": audit.head.hex(),
                "bad_entry": None if audit.error is None else audit.error.index,
                "error": None if audit.error is None else str(audit.error),
                "rounds": self.rows, "aggregator_budget": self.budget}


def ledger_report(entries: list[ChainEntry], aggregator_key: bytes, source: str,
                  expected_head: bytes | None = None, budget: dict | None = None
                  ) -> LedgerReport:
    """Verifies `entries` against the aggregator's key and reports each round."""
    audit = trail.audit_ledger(entries, aggregator_key, expected_head)
    return LedgerReport(audit, ledger_rows(audit), source, budget)
