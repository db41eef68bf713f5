"""`audit version`'s report: a published version's signature and file hashes and, given
the ledger, whether the ledger records this exact manifest, as one JSON-able document."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetmind.aggregation.chain import ChainEntry
from fleetmind.audit import trail

__all__ = ["VersionReport", "version_report"]


@dataclass(frozen=True)
class VersionReport:
    """What `audit version` found. `ledger_audit`: the ledger it was checked against (None:
    none given); `problems`: every reason it does not verify (empty: it does)."""

    audit: trail.VersionAudit
    ledger_audit: trail.ChainAudit | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        manifest = self.audit.manifest
        return {"ok": self.ok, "folder": str(self.audit.folder),
                "error": "; ".join(self.problems) or None,
                "version_hash": self.audit.version_hash,
                "manifest": None if manifest is None else json.loads(manifest.to_bytes()),
                "ledger_checked": self.ledger_audit is not None,
                "ledger_entry": self.audit.ledger_entry,
                "disagreements": list(self.audit.disagreements)}


def version_report(folder: Path, aggregator_key: bytes,
                   ledger_entries: list[ChainEntry] | None = None) -> VersionReport:
    """Verifies the version in `folder` and, with `ledger_entries`, its ledger entry."""
    ledger_audit = None if ledger_entries is None else trail.audit_ledger(ledger_entries,
                                                                          aggregator_key)
    audit = trail.audit_version(Path(folder), aggregator_key, ledger_audit)
    problems = ([audit.error] if audit.error else []) + list(audit.disagreements)
    if ledger_audit is not None and not ledger_audit.ok:
        problems.append(f"the ledger does not verify: {ledger_audit.error}")
    return VersionReport(audit, ledger_audit, problems)
