"""What coordinator.json holds: the coordinator's state on disk (server/coordinator.py).

Typed records over the JSON the file has always held: from_json reads files written
before these types (absent keys take their defaults) and to_json writes the same shape.
The coordinator writes the file atomically at every step that must survive a crash (a
round in flight, its outcome before publishing, a charge spent, a round stopped), so a
restart finishes or abandons a round from it alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fleetmind.aggregation.accountant import RoundCharge
from fleetmind.aggregation.records import StoppedRound

STATE_FILE = "coordinator.json"


def _charge_json(charge: RoundCharge) -> dict:
    return asdict(charge)


def _charge_from_json(raw: Mapping[str, Any]) -> RoundCharge:
    return RoundCharge(**raw)


@dataclass
class Outcome:
    """A published round's numbers, saved before publishing so a crash after it still
    writes the ledger entry at restart. units and server_step: the privacy units the sum
    held and the step the merge applied (None in a state saved before they were kept: the
    ledger entry then leaves them out, as entries from before them do). server_learning_rate
    and server_step_units: the rule that gave the step, as configured when the round merged
    (a restart under another config still records the rule the step came from; None in a
    state saved before it was kept: the entry then has the step without its rule)."""

    cohort_size: int
    dropouts: int
    epsilon_round: float
    epsilon_total: float
    payload_sha256s: tuple[str, ...] = ()
    units: int | None = None
    server_step: float | None = None
    server_learning_rate: float | None = None
    server_step_units: int | None = None

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "cohort_size": self.cohort_size, "dropouts": self.dropouts,
            "payload_sha256s": list(self.payload_sha256s),
            "epsilon_round": self.epsilon_round, "epsilon_total": self.epsilon_total}
        if self.units is not None:
            value["units"], value["server_step"] = self.units, self.server_step
        if self.server_learning_rate is not None:
            value["server_learning_rate"] = self.server_learning_rate
            value["server_step_units"] = self.server_step_units
        return value

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Outcome:
        units, step = raw.get("units"), raw.get("server_step")
        rate, reference = raw.get("server_learning_rate"), raw.get("server_step_units")
        return cls(int(raw["cohort_size"]), int(raw["dropouts"]), float(raw["epsilon_round"]),
                   float(raw["epsilon_total"]), tuple(raw.get("payload_sha256s", ())),
                   None if units is None else int(units),
                   None if step is None else float(step),
                   None if rate is None else float(rate),
                   None if reference is None else int(reference))


@dataclass
class InFlight:
    """The running round, on disk before any site hears of it."""

    round_id: int
    phase: str
    cohort: tuple[int, ...]
    charge: RoundCharge
    outcome: Outcome | None = None

    def to_json(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "phase": self.phase, "cohort": list(self.cohort),
                "charge": _charge_json(self.charge),
                "outcome": None if self.outcome is None else self.outcome.to_json()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> InFlight:
        outcome = raw.get("outcome")
        return cls(int(raw["round_id"]), str(raw["phase"]), tuple(raw.get("cohort", ())),
                   _charge_from_json(raw["charge"]),
                   Outcome.from_json(outcome) if outcome else None)


@dataclass
class Spent:
    """A round whose privacy charge is spent (published, or its sum seen and rejected)."""

    round_id: int
    charge: RoundCharge

    def to_json(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "charge": _charge_json(self.charge)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Spent:
        return cls(int(raw["round_id"]), _charge_from_json(raw["charge"]))


@dataclass
class Abandoned:
    """A round in flight at a restart: nothing was released. `phase` None: an older file."""

    round_id: int
    reason: str
    phase: str | None = None

    def to_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"round_id": self.round_id, "reason": self.reason}
        if self.phase is not None:
            raw["phase"] = self.phase
        return raw

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Abandoned:
        return cls(int(raw["round_id"]), str(raw["reason"]), raw.get("phase"))


@dataclass
class Rejected:
    """An unmasked sum that failed the aggregate check."""

    round_id: int
    reason: str
    contributors: tuple[int, ...]
    payload_sha256s: tuple[str, ...]
    rejected_at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "reason": self.reason,
                "contributors": list(self.contributors),
                "payload_sha256s": list(self.payload_sha256s),
                "rejected_at_ms": self.rejected_at_ms}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Rejected:
        return cls(int(raw["round_id"]), str(raw["reason"]), tuple(raw.get("contributors", ())),
                   tuple(raw.get("payload_sha256s", ())), int(raw.get("rejected_at_ms", 0)))


@dataclass
class CoordinatorState:
    """Everything in coordinator.json. participation_cap: the K the budget was accounted
    under (None: no cap); at restart it may not fall, nor appear once rounds were spent.
    stopped: the ledger entries of the last rounds that ended without a version, written
    here before the ledger (a restart appends any the ledger lacks)."""

    next_round: int = 1
    spent: list[Spent] = field(default_factory=list)
    in_flight: InFlight | None = None
    abandoned: list[Abandoned] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    suspects: list[int] = field(default_factory=list)
    quarantined: dict[int, str] = field(default_factory=dict)
    participation_cap: int | None = None
    stopped: list[StoppedRound] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"next_round": self.next_round, "spent": [c.to_json() for c in self.spent],
                "in_flight": None if self.in_flight is None else self.in_flight.to_json(),
                "abandoned": [a.to_json() for a in self.abandoned],
                "rejected": [r.to_json() for r in self.rejected],
                "suspects": list(self.suspects),
                "quarantined": {str(s): why for s, why in sorted(self.quarantined.items())},
                "participation_cap": self.participation_cap,
                "stopped": [json.loads(entry.to_body()) for entry in self.stopped]}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CoordinatorState:
        flight = raw.get("in_flight")
        cap = raw.get("participation_cap")
        return cls(next_round=int(raw.get("next_round", 1)),
                    spent=[Spent.from_json(c) for c in raw.get("spent", ())],
                    in_flight=InFlight.from_json(flight) if flight else None,
                    abandoned=[Abandoned.from_json(a) for a in raw.get("abandoned", ())],
                    rejected=[Rejected.from_json(r) for r in raw.get("rejected", ())],
                    suspects=[int(s) for s in raw.get("suspects", ())],
                    quarantined={int(s): str(why)
                                 for s, why in raw.get("quarantined", {}).items()},
                    participation_cap=None if cap is None else int(cap),
                    stopped=[StoppedRound(**entry) for entry in raw.get("stopped", ())])
