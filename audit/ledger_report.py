"""`audit ledger`'s report: the ledger's verified rounds (published, and stopped without a
version), what they spent, and where the chain broke, as one JSON-able document (the CLI
prints it or tables it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fleetmind.aggregation.chain import ChainEntry
from fleetmind.aggregation.records import RoundRecord, StoppedRound
from fleetmind.audit import trail

__all__ = ["LedgerReport", "epsilon_meaning", "ledger_report", "ledger_rows", "stopped_rows",
           "when"]


def when(ms: int) -> str:
    """A record's millisecond timestamp as UTC, to the second."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def epsilon_meaning(privacy_unit: str | None, participation_cap: int | None) -> str:
    """What a ledger entry's epsilon_total is: per unit over the fleet's life under a
    participation cap K, or every round composed without one."""
    unit = privacy_unit or "unit"
    if participation_cap is not None:
        return f"ε per {unit} under cap {participation_cap}"
    return f"ε per {unit}, every round composed (no participation cap)"


def ledger_rows(audit: trail.ChainAudit) -> list[dict[str, Any]]:
    """One row per verified entry of a published round: the round's privacy and what it
    published. participation_cap: K when the round ran under a participation cap (None:
    none, or an entry from before caps); epsilon_meaning says what epsilon_total is then.
    units and server_step: the privacy units the round summed and the step its merge
    applied (None: an entry from before they were recorded); server_learning_rate and
    server_step_units: the rule that gave the step, which the entry was checked against
    when it was read (None: an entry from before the rule was recorded; server_step_units
    None beside a rate: every round steps the rate)."""
    return [{"entry": entry.index, "round": record.round_id, "version": record.version,
             "cohort_size": record.cohort_size, "dropouts": record.dropouts,
             "clip_norm": record.clip_norm, "privacy_unit": record.privacy_unit,
             "participation_cap": record.participation_cap,
             "epsilon_meaning": epsilon_meaning(record.privacy_unit,
                                                record.participation_cap),
             "noise_mode": record.noise_mode, "noise_multiplier": record.noise_multiplier,
             "epsilon_round": record.epsilon_round, "epsilon_total": record.epsilon_total,
             "delta": record.delta, "secure_aggregation": record.secure_aggregation,
             "units": record.units, "server_step": record.server_step,
             "server_learning_rate": record.server_learning_rate,
             "server_step_units": record.server_step_units,
             "version_hash": record.version_hash, "recorded_at": when(record.recorded_at_ms),
             "entry_hash": entry.hash.hex()}
            for entry, record in audit.verified if isinstance(record, RoundRecord)]


def stopped_rows(audit: trail.ChainAudit) -> list[dict[str, Any]]:
    """One row per verified entry of a round stopped after unmasking without a version
    (records.StoppedRound): which round and phase, the outcome, the check that refused it
    with its number and allowed range, what it spent, the sites it quarantined."""
    return [{"entry": entry.index, "round": record.round_id, "outcome": record.outcome,
             "phase": record.phase, "check": record.check, "measured": record.measured,
             "allowed": None if record.allowed is None else list(record.allowed),
             "contributors": record.contributors, "version": record.version,
             "privacy_unit": record.privacy_unit,
             "participation_cap": record.participation_cap,
             "epsilon_meaning": epsilon_meaning(record.privacy_unit,
                                                record.participation_cap),
             "epsilon_round": record.epsilon_round, "epsilon_total": record.epsilon_total,
             "delta": record.delta, "quarantined": list(record.quarantined),
             "receipts": len(record.payload_sha256s),
             "recorded_at": when(record.recorded_at_ms), "entry_hash": entry.hash.hex()}
            for entry, record in audit.verified if isinstance(record, StoppedRound)]


@dataclass(frozen=True)
class LedgerReport:
    """What `audit ledger` found in the ledger read from `source`. `budget`: the
    aggregator's unsigned word on its budget (None: read from a file, or not answered)."""

    audit: trail.ChainAudit
    rows: list[dict[str, Any]]
    stopped: list[dict[str, Any]]
    source: str
    budget: dict | None

    @property
    def ok(self) -> bool:
        return self.audit.ok

    def as_json(self) -> dict[str, Any]:
        audit = self.audit
        return {"ok": audit.ok, "source": self.source, "entries": audit.read,
                "verified": len(self.rows) + len(self.stopped), "head": audit.head.hex(),
                "bad_entry": None if audit.error is None else audit.error.index,
                "error": None if audit.error is None else str(audit.error),
                "rounds": self.rows, "stopped_rounds": self.stopped,
                "aggregator_budget": self.budget, "privacy_spent": self.privacy_spent}

    @property
    def last(self) -> dict[str, Any] | None:
        """The last verified entry's row, published or stopped (a rejected round spends
        too, so the last entry of either kind holds the total)."""
        rows = sorted(self.rows + self.stopped, key=lambda row: row["entry"])
        return rows[-1] if rows else None

    @property
    def privacy_spent(self) -> str | None:
        """The last verified entry's epsilon, in words: "ε per user under cap 4: 5.68 at
        δ 1e-05" (None: no entry verified)."""
        last = self.last
        if last is None:
            return None
        return f"{last['epsilon_meaning']}: {last['epsilon_total']:.4g} at δ {last['delta']:g}"


def ledger_report(entries: list[ChainEntry], aggregator_key: bytes, source: str,
                  expected_head: bytes | None = None, budget: dict | None = None
                  ) -> LedgerReport:
    """Verifies `entries` against the aggregator's key and reports each round."""
    audit = trail.audit_ledger(entries, aggregator_key, expected_head)
    return LedgerReport(audit, ledger_rows(audit), stopped_rows(audit), source, budget)
