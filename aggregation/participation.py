"""Bounded participation: each privacy unit (session, user or site) enters at most K rounds
over the fleet's life, so its privacy loss composes at most K rounds' mechanisms however
long the fleet runs (the accounting is `accountant.epsilon_per_unit`; docs/privacy-budget.md).

The cap is enforced where the data is, at the site, before anything is sent:

    ParticipationCap       K, validated once
    eligible_units         which of this round's candidate units are still under the cap
    record_round           the record of the units entering a round (refuses any at the cap),
                           which the site writes to its outbox before the upload leaves
    participation_history  unit -> rounds entered, rebuilt from those records (and checked),
                           so the count survives restarts and an auditor can recount it

A unit's rounds are counted by round id: the same round sent again (a re-attach after a
crash) counts once. A round that aborts after the record was written still counts (nothing
may have left, but the site cannot know): the count errs high, never low.

Pure: no I/O and no dp-accounting, so a site can enforce a cap without the accountant.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetmind.aggregation.dp import check_privacy_unit

__all__ = ["CapReachedError", "ParticipationCap", "ParticipationRecord", "eligible_units",
           "participation_history", "record_round"]

MAX_UNIT_ID_CHARS = 200  # as the session store's ids (client/store.py MAX_ID_CHARS)


class CapReachedError(ValueError):
    """Units at their participation cap were about to enter a round: nothing may be sent."""


@dataclass(frozen=True)
class ParticipationCap:
    """max_rounds: K, the most rounds one privacy unit may enter over the fleet's life."""

    max_rounds: int

    def __post_init__(self) -> None:
        k = self.max_rounds
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"max_rounds={k!r} must be a whole number >= 1 (the most rounds "
                             "one privacy unit may enter over the fleet's life), e.g. "
                             "ParticipationCap(8); for no cap pass None where a cap is "
                             "optional")
        object.__setattr__(self, "max_rounds", int(k))


def _unit_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_UNIT_ID_CHARS \
            or not value.isprintable():
        shown = f"{str(value)[:40]!r}"
        raise ValueError(f"unit id {shown} is not a unit id: pass the session id, user id or "
                         f"site name (1 to {MAX_UNIT_ID_CHARS} printable characters), never "
                         "session text")
    return value


def _round_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"round_id={value!r} must be a whole number >= 0")
    return int(value)


@dataclass(frozen=True)
class ParticipationRecord:
    """The units that enter round `round_id` from one site, each with its count: the number
    of rounds it has entered including this one (1..max_rounds). privacy_unit says what the
    ids are (session, user or site); max_rounds is the cap in force. Stored sorted by unit
    id; JSON-ready through to_json/from_json (for the outbox)."""

    round_id: int
    privacy_unit: str
    max_rounds: int
    counts: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "round_id", _round_id(self.round_id))
        check_privacy_unit(self.privacy_unit)
        cap = ParticipationCap(self.max_rounds)
        object.__setattr__(self, "max_rounds", cap.max_rounds)
        if isinstance(self.counts, str | bytes) or not isinstance(self.counts, Iterable):
            raise ValueError(f"counts={self.counts!r:.60} must be (unit id, count) pairs")
        pairs: list[tuple[str, int]] = []
        for pair in self.counts:
            unit, count = pair
            unit = _unit_id(unit)
            if isinstance(count, bool) or not isinstance(count, numbers.Integral) \
                    or not 1 <= count <= cap.max_rounds:
                raise ValueError(f"unit {unit!r} has count={count!r}: a unit entering a round "
                                 f"has entered 1 to max_rounds={cap.max_rounds} rounds; a unit "
                                 "at the cap must not enter (see eligible_units)")
            pairs.append((unit, int(count)))
        if len({unit for unit, _ in pairs}) != len(pairs):
            raise ValueError("counts lists a unit twice: each unit enters a round once")
        object.__setattr__(self, "counts", tuple(sorted(pairs)))

    def to_json(self) -> dict[str, object]:
        return {"round_id": self.round_id, "privacy_unit": self.privacy_unit,
                "max_rounds": self.max_rounds, "counts": dict(self.counts)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ParticipationRecord:
        if not isinstance(raw, Mapping) or set(raw) != {"round_id", "privacy_unit",
                                                        "max_rounds", "counts"}:
            raise ValueError(f"{raw!r:.80} is not a participation record: want round_id, "
                             "privacy_unit, max_rounds and counts")
        if not isinstance(raw["counts"], Mapping):
            raise ValueError("counts must map unit id -> count")
        return cls(raw["round_id"], raw["privacy_unit"], raw["max_rounds"],
                   tuple(raw["counts"].items()))


def _entered(history: Mapping[str, Collection[int]], unit: str) -> Collection[int]:
    return history.get(unit, ())


def eligible_units(units: Iterable[str], history: Mapping[str, Collection[int]],
                   cap: ParticipationCap, round_id: int | None = None) -> tuple[str, ...]:
    """Of this round's candidate `units` (ids, in order, duplicates once), those that may
    enter: fewer than cap.max_rounds rounds in `history` (unit -> round ids it entered;
    units absent have entered none). A unit already recorded in `round_id` itself (the same
    round sent again) stays eligible: that round is counted once."""
    if not isinstance(cap, ParticipationCap):
        raise TypeError(f"cap={cap!r} must be a ParticipationCap, e.g. ParticipationCap(8)")
    if round_id is not None:
        round_id = _round_id(round_id)
    seen: set[str] = set()
    eligible = []
    for unit in units:
        unit = _unit_id(unit)
        if unit in seen:
            continue
        seen.add(unit)
        entered = set(_entered(history, unit))
        if round_id in entered or len(entered) < cap.max_rounds:
            eligible.append(unit)
    return tuple(eligible)


def record_round(units: Iterable[str], history: Mapping[str, Collection[int]],
                 cap: ParticipationCap, round_id: int, privacy_unit: str
                 ) -> ParticipationRecord:
    """The record of `units` entering `round_id`, each with its new count. Raises
    CapReachedError (naming the units) if any is at the cap: the site must drop those
    units (eligible_units) and compute its update again before anything is sent."""
    round_id = _round_id(round_id)
    units = list(dict.fromkeys(_unit_id(unit) for unit in units))
    allowed = set(eligible_units(units, history, cap, round_id))
    over = [unit for unit in units if unit not in allowed]
    if over:
        shown = ", ".join(repr(unit) for unit in over[:5]) + (" ..." if len(over) > 5 else "")
        raise CapReachedError(
            f"{len(over)} {privacy_unit} unit(s) already entered {cap.max_rounds} rounds, the "
            f"participation cap: {shown}; leave them out of round {round_id} (eligible_units) "
            "and compute the update again")
    counts = tuple((unit, len(set(_entered(history, unit)) | {round_id})) for unit in units)
    return ParticipationRecord(round_id, privacy_unit, cap.max_rounds, counts)


def participation_history(records: Iterable[ParticipationRecord]) -> dict[str, tuple[int, ...]]:
    """unit id -> the round ids it entered (sorted), from a site's records in the order they
    were written. Checks each record's counts against the rounds before it, so an outbox
    whose counts were understated is caught: raises ValueError naming the unit and round."""
    history: dict[str, set[int]] = {}
    for record in records:
        for unit, count in record.counts:
            entered = history.setdefault(unit, set())
            entered.add(record.round_id)
            if count != len(entered):
                raise ValueError(f"unit {unit!r} is recorded in round {record.round_id} as its "
                                 f"participation {count}, but the records before show "
                                 f"{len(entered)}: the participation records are inconsistent "
                                 "(edited, or written out of order)")
    return {unit: tuple(sorted(rounds)) for unit, rounds in history.items()}
