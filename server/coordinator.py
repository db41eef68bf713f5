"""The round/cohort coordinator: ready sites -> cohort -> SecAgg+ phases -> version N+1.

Plain Python, no transport (the gRPC services in `service.py` call it, tests can too):

    join()             a site is ready (queued for the next cohort) or re-attaches to its round
    tick()             time passes: a cohort forms (target size, or min size at the deadline),
                       a phase closes at its deadline
    advertise/share/submit/unmask
                       one site's message of each phase, fed to the library's server state
                       (aggregation.secagg); a phase closes early once every live site answered
    follow()           the events a site must see, in order, replayable from any index

With `CohortPolicy.secure_aggregation` off (the loopback-only ablation) a round has one
phase: sites upload their vectors unmasked through `submit`, and the library's
ServerPlainInputCollection sums them; from the cohort sum on, both modes share every step
below, and the round's version and ledger entry say it was not securely aggregated.

One round runs at a time. Before it starts the round is charged to the privacy `Budget`
(refused when the budget cannot pay; with `privacy.participation_cap` K, epsilon is per
unit over K rounds, and the cap, saved in coordinator.json, may never fall) and written to
`coordinator.json` (`CoordinatorState`, coordinator_state.py) as in flight. When
the library yields the unmasked cohort sum the coordinator opens it (`open_secagg_sum`),
adds central noise if configured, applies FedAvg (`exact_merge`), publishes the version
through `VersionRegistry.publish`, appends the ledger entry, and only then records the
charge as spent; the version's watchers are woken after the round has ended and the lock
is free (`_announce`), so the fan-out to thousands of Watch streams never holds the round.
A round in flight at restart is marked abandoned on disk (nothing was released, so
nothing was spent) and its sites are told to re-join: the round runs again under a new
round id, since SecAgg keys and masks are bound to the round id.

Before anything is signed the unmasked sum is checked (`_check_aggregate`, by
`aggregation.aggregate_check`, which the Flower ServerApp runs too): the weight sum within
what the contributors' staleness weights allow, every value finite, the mean delta's norm
within what the cohort's clip and noise allow (`AggregateBounds.mean_delta_bound`, derived
there and in docs/hardening.md). A sum that fails ends the round (RoundAborted, retry) and
is recorded under "rejected" in coordinator.json and as a signed ledger entry
(records.StoppedRound: the check, its numbers, the sites quarantined); its privacy charge is
spent, since the aggregator saw it. A sum that cannot be merged gets such an entry too,
and spends nothing. Masked vectors cannot be checked alone; unmasked ones (no secure
aggregation) are, at upload (`_check_plain_vector`).

A round that ends without a version, or a site that leaves one, hears `Stopped` with the
phase and a `DropReason` (site_only when only that site left): sites decide from those
fields, never from the text, whether their vector may be in a sum.

Every message is idempotent by (round, site): the same message again gets the same
receipt; a different one for a slot already filled is refused as a replay. A refused
message changes no state (the library's states check before they mutate, and a receipt is
recorded only after the state accepted the message).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast

import numpy as np

from fleetmind.aggregation.accountant import (
    AccountingMethod,
    Budget,
    RoundCharge,
    epsilon_of,
    worst_case_charge,
)
from fleetmind.aggregation.aggregate_check import (
    AggregateBounds,
    AggregateRejectedError,
    check_merged,
)
from fleetmind.aggregation.dp import DPConfig, NoiseMode, PrivacyUnit, noise_for_aggregator
from fleetmind.aggregation.encoding import encoding_codes
from fleetmind.aggregation.merge import (
    FedAvg,
    cohort_step,
    exact_merge,
    flatten,
    open_secagg_sum,
    unflatten,
)
from fleetmind.aggregation.participation import ParticipationCap
from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.records import LedgerRecord, RoundRecord, StoppedRound
from fleetmind.aggregation.secagg import (
    DropReason,
    NeighbourGraph,
    ProtocolError,
    RoundConfig,
    RoundPhase,
    ServerAborted,
    ServerAdvertiseKeys,
    ServerCompleted,
    majority_threshold,
    secagg_plus_degree,
)
from fleetmind.aggregation.secagg.messages import (
    AdvertisedKeys,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    SharesForSite,
    UnmaskRequest,
    UnmaskShares,
)
from fleetmind.aggregation.secagg.server_r1_share_keys import ServerShareKeys
from fleetmind.aggregation.secagg.server_r2_masked_input_collection import (
    ServerMaskedInputCollection,
)
from fleetmind.aggregation.secagg.server_r2_plain_input_collection import (
    ServerPlainInputCollection,
)
from fleetmind.aggregation.secagg.server_r3_unmasking import ServerUnmasking
from fleetmind.runtime.durable import atomic_write
from fleetmind.runtime.signed_log import canonical_json
from fleetmind.server.config import CohortPolicy, ConfigError, PrivacyPolicy
from fleetmind.server.coordinator_state import (
    STATE_FILE,
    Abandoned,
    CoordinatorState,
    InFlight,
    Outcome,
    Rejected,
    Spent,
)
from fleetmind.server.enrolment import Enrolments
from fleetmind.server.ledger import Ledger
from fleetmind.server.limits import ServerLimits
from fleetmind.server.versions import Release, Version, VersionRegistry
from fleetmind.server.waiters import Waiters

KEEP_FINISHED = 16  # finished rounds kept in memory, so late re-attaches replay their end
KEEP_REJECTED = 64  # rejected aggregates kept in coordinator.json, newest last
# The most a version's watchers wait for the round's followers to take their outcome (they
# were woken first and need only the lock; a safety bound, not a pace).
TELL_COHORT_S = 2.0
RefusalKind = Literal["budget_exhausted", "too_large", "upload_bytes", "not_found", "malformed",
                      "quarantined"]
# The library's server state of a phase that takes messages (ServerPlainInputCollection is a
# ServerMaskedInputCollection), and what a round's state may be: one of those or final.
PhaseState = ServerAdvertiseKeys | ServerShareKeys | ServerMaskedInputCollection | ServerUnmasking
RoundState = PhaseState | ServerCompleted | ServerAborted
_Phase = TypeVar("_Phase", bound=PhaseState)


class RefusedError(Exception):
    """A request the coordinator refuses outside the secure-aggregation protocol:
    budget_exhausted / too_large / upload_bytes (uploads in flight) -> RESOURCE_EXHAUSTED,
    not_found -> NOT_FOUND, malformed -> INVALID_ARGUMENT, quarantined -> PERMISSION_DENIED.
    Nothing changed."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---- what a site sees, in order ------------------------------------------------------


@dataclass(frozen=True)
class RoundSetup:
    """The round's secure-aggregation config plus how sites encode their update
    (fleet.proto RoundConfig). Without `secure_aggregation` sites skip straight to the
    upload, unmasked; the config's graph then only names the cohort."""

    config: RoundConfig
    base_version: int
    clip_norm: float
    noise_multiplier: float
    noise_mode: NoiseMode
    privacy_unit: PrivacyUnit
    expected_cohort: int
    fixed_point_clip: float
    cohort_max: int
    phase_deadline_unix_ms: int
    secure_aggregation: bool
    participation_cap: int = 0  # K the accountant assumes; 0: none


@dataclass(frozen=True)
class Finished:
    """The round published `version` from `cohort_size` sites' vectors."""

    version: int
    cohort_size: int
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class Stopped:
    """The round ended without a version in `phase` (`site_only`: only this site left it, in
    `phase`, and the round goes on); `drop_reason` says why for programs, `reason` for
    people. With `retry` the site may join the next cohort. `phase` is None only for a round
    abandoned before the phase was recorded (coordinator.json from older aggregators)."""

    reason: str
    retry: bool
    phase: RoundPhase | None
    drop_reason: DropReason
    site_only: bool = False


Payload = RoundSetup | AdvertisedKeys | SharesForSite | UnmaskRequest | Finished | Stopped


@dataclass(frozen=True)
class Event:
    round_id: int  # 0 only for a refusal while still queued
    payload: Payload

    @property
    def terminal(self) -> bool:
        return isinstance(self.payload, Finished | Stopped)


@dataclass(frozen=True)
class Waiting:
    ready_sites: int
    target_cohort: int
    deadline_unix_ms: int


@dataclass(frozen=True)
class BudgetStatus:
    epsilon_spent: float
    epsilon_budget: float
    delta: float
    rounds: int
    accountant: str
    participation_cap: int | None = None  # K; epsilon_spent is then per unit


class RoundListener:
    """What the coordinator tells an observer (server/metrics.py) as rounds run. The base
    class ignores everything; calls come under the coordinator's lock, so a listener must
    be quick and must not call back into the coordinator."""

    def round_started(self, round_id: int, cohort_size: int) -> None:
        """A cohort of `cohort_size` sites started round `round_id`."""

    def phase_closed(self, round_id: int, phase: str, seconds: float, dropped: int) -> None:
        """`phase` closed after `seconds`; `dropped` sites missed it."""

    def round_ended(self, round_id: int, outcome: str, seconds: float | None,
                    contributors: int = 0) -> None:
        """outcome: published, aborted, abandoned (at a restart) or refused (the budget could
        not pay; it never started). `seconds` is None for a round that did not run here."""

    def state(self, version: int, epsilon_spent: float, epsilon_budget: float,
              delta: float) -> None:
        """The latest version and the privacy spent, at start and after each publication."""

    def refused(self, reason: str) -> None:
        """Something was refused for `reason` (server/metrics.py REFUSAL_REASONS): here, an
        unmasked sum the aggregate checks rejected."""


# ---- the rounds ------------------------------------------------------------------------


@dataclass
class _Ticket:
    base_version: int
    units: int
    since: float
    serial: int  # which join made it: a stale hang-up must not dequeue a newer join


@dataclass
class _Round:
    setup: RoundSetup
    charge: RoundCharge
    state: RoundState  # the library's server state of the current phase, or a final state
    cohort: tuple[int, ...]
    events: dict[int, list[Event]]
    receipts: dict[tuple[str, int], bytes]
    phase_deadline: float
    shapes: dict[str, tuple[int, ...]]
    # time.monotonic() at the round's and the current phase's start, for latencies only
    # (deadlines use the coordinator's clock, which tests may move).
    started: float = 0.0
    phase_started: float = 0.0
    units: dict[int, int] = field(default_factory=dict)  # contributing_units, from join

    @property
    def round_id(self) -> int:
        return self.setup.config.round_id


def _digest(*parts: bytes | int) -> bytes:
    """sha256 over length-prefixed fields: a request's identity for idempotency."""
    digest = hashlib.sha256()
    for part in parts:
        raw = part if isinstance(part, bytes) else struct.pack("<q", part)
        digest.update(struct.pack("<I", len(raw)) + raw)
    return digest.digest()


# PrivacyPolicy (server/config.py) holds these as text and refuses, in __post_init__, any
# value but the ones each Literal names: reading them off a PrivacyPolicy narrows, no more.


def _noise_mode(privacy: PrivacyPolicy) -> NoiseMode:
    return cast(NoiseMode, privacy.noise_mode)  # checked in PrivacyPolicy.__post_init__


def _privacy_unit(privacy: PrivacyPolicy) -> PrivacyUnit:
    return cast(PrivacyUnit, privacy.privacy_unit)  # checked in PrivacyPolicy.__post_init__


def _accountant(privacy: PrivacyPolicy) -> AccountingMethod:
    return cast(AccountingMethod, privacy.accountant)  # checked in PrivacyPolicy.__post_init__


def _dp_config(privacy: PrivacyPolicy, expected_cohort: int) -> DPConfig:
    return DPConfig(privacy.clip_norm, privacy.noise_multiplier, _privacy_unit(privacy),
                    _noise_mode(privacy), expected_cohort)


class Coordinator:
    """Owns `data_dir/coordinator.json`; the registry and ledger are shared with the
    services (which only read them). Thread-safe: one lock guards every round."""

    def __init__(self, data_dir: Path, registry: VersionRegistry, ledger: Ledger,
                 enrolments: Enrolments, cohort: CohortPolicy, privacy: PrivacyPolicy,
                 clock: Callable[[], float] = time.time,
                 listener: RoundListener | None = None,
                 limits: ServerLimits | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.limits = limits or ServerLimits()
        self.listener = listener or RoundListener()
        self.registry = registry
        self.ledger = ledger
        self.enrolments = enrolments
        self.cohort_policy = cohort
        self.privacy = privacy
        self.clock = clock
        # One lock guards every round. Waiters are woken by what they wait for, never all
        # at once (1,000 JoinRound streams each woken by every join was a thundering herd,
        # docs/scale.md): Waiters per site (server/waiters.py), notified when that site's
        # events or queue place change, each follower on its own event, which its stream
        # also sets when its caller hangs up; a round's ledger entry wakes its StreamLedger
        # followers, and its version its watchers, only once the round is done (the
        # watchers once its sites have their outcome too: `_announce`).
        # `_changed` (any change) is for `wait`, which the services never use.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._site_waits: dict[int, Waiters] = {}
        # A version published whose watchers are not woken yet: the round's followers to
        # let take their outcome first (None: nothing to announce). `_announcer` wakes them.
        self._announcing: list[tuple[Waiters, frozenset[object]]] | None = None
        # A ledger entry appended whose StreamLedger followers are not woken yet (`_announce`).
        self._ledger_news = False
        self._announcer: threading.Thread | None = None
        self._queue: dict[int, _Ticket] = {}
        # min(t.since) over the queue, or None when unknown (recomputed on demand): a
        # heartbeat and every join read it, and scanning a 1,000-site queue each time cost.
        self._queue_first: float | None = None
        self._queue_refusals: dict[int, str] = {}
        self._serial = 0
        self._join_refusal: tuple[int, str | None] | None = None  # (rounds spent, refusal)
        self._round: _Round | None = None
        self._finished: dict[int, _Round] = {}
        self._state_path = self.data_dir / STATE_FILE
        state = self._load_state()
        cap = privacy.participation_cap
        self._check_cap(state, cap)
        self.budget = Budget(privacy.epsilon_budget, privacy.delta, _accountant(privacy),
                             [c.charge for c in state.spent],
                             cap=ParticipationCap(cap) if cap else None)
        state.participation_cap = cap or None
        self._state = state
        self._recover()
        self._report_state()

    # ---- persistence --------------------------------------------------------------

    def _load_state(self) -> CoordinatorState:
        if self._state_path.exists():
            return CoordinatorState.from_json(json.loads(self._state_path.read_bytes()))
        return CoordinatorState()

    def _check_cap(self, state: CoordinatorState, cap: int | None) -> None:
        """The participation cap may rise over a fleet's life, never fall (units may have
        entered the higher number of rounds) nor appear once rounds were spent uncapped
        (epsilon so far composed every round; per-unit accounting would undercount it)."""
        saved = state.participation_cap
        if saved is not None and (cap is None or cap < saved):
            raise ConfigError(f"privacy.participation_cap={cap} is below the cap {saved} this "
                             f"aggregator's {len(state.spent)} rounds were accounted under "
                             f"({self._state_path}): units may have entered {saved} rounds; "
                             f"set participation_cap >= {saved}")
        if saved is None and cap is not None and state.spent:
            raise ConfigError(f"privacy.participation_cap={cap} added after {len(state.spent)} "
                             "rounds were spent without a cap: their epsilon composes every "
                             "round; remove the cap, or start a new fleet (a new data_dir)")

    def _save(self) -> None:
        atomic_write(self._state_path, canonical_json(self._state.to_json()))

    def _recover(self) -> None:
        """Finish the bookkeeping of a round that published before a crash; abandon one
        that did not. Round ids only move forward, past anything on disk."""
        state = self._state
        self._ledger_stopped_entries()
        latest = self.registry.latest()
        flight = state.in_flight
        if flight is not None:
            if latest is not None and latest.manifest.round_id == flight.round_id \
                    and flight.outcome is not None:
                self._record_published(latest, flight)
            else:
                state.abandoned.append(Abandoned(
                    flight.round_id, f"the aggregator restarted during {flight.phase}; "
                                     "nothing was released", flight.phase))
                state.abandoned = state.abandoned[-KEEP_FINISHED:]
                self._stop(self._stopped_entry(
                    flight.round_id, "abandoned", flight.phase,
                    drop_reason=DropReason.ABANDONED_AT_RESTART))
                self.listener.round_ended(flight.round_id, "abandoned", None)
            state.in_flight = None
        head = self.ledger.head()
        floor = max([state.next_round]
                    + ([latest.manifest.round_id + 1] if latest and latest.manifest.round_id
                       is not None else [])
                    + ([head.record.round_id + 1] if head else []))
        state.next_round = floor
        self._save()

    def _record_published(self, version: Version, flight: InFlight) -> None:
        """The ledger entry and the spent charge of a published round, each at most once."""
        outcome = flight.outcome
        assert outcome is not None  # saved before publishing
        if self.ledger.find_round(flight.round_id) is None:
            self._append_to_ledger(RoundRecord(
                round_id=flight.round_id, cohort_size=outcome.cohort_size,
                dropouts=outcome.dropouts, clip_norm=self.privacy.clip_norm,
                privacy_unit=self.privacy.privacy_unit,
                participation_cap=self.privacy.participation_cap,
                noise_multiplier=self.privacy.noise_multiplier,
                noise_mode=self.privacy.noise_mode, epsilon_round=outcome.epsilon_round,
                epsilon_total=outcome.epsilon_total, delta=self.privacy.delta,
                version=version.number, version_hash=version.manifest_sha256(),
                payload_sha256s=outcome.payload_sha256s,
                units=outcome.units, server_step=outcome.server_step,
                server_learning_rate=outcome.server_learning_rate,
                server_step_units=outcome.server_step_units,
                # From the signed manifest, not today's config: the mode may have changed
                # between publishing and this restart.
                secure_aggregation=version.manifest.secure_aggregation))
        if all(c.round_id != flight.round_id for c in self._state.spent):
            self._state.spent.append(Spent(flight.round_id, flight.charge))
            self.budget.charges.append(flight.charge)

    # ---- privacy ------------------------------------------------------------------

    def _charge_for(self, cohort_size: int) -> RoundCharge:
        """What a round of `cohort_size` sites costs, charged before it runs. Sites that
        drop take their share of distributed noise with them, so it is charged as if only
        the minimum cohort contributed: the most a completed round can have spent."""
        return worst_case_charge(_dp_config(self.privacy, cohort_size),
                                 self.cohort_policy.min_size, self.privacy.unit_uses)

    def _check_budget(self, charge: RoundCharge) -> str | None:
        refusal = self.budget.refusal(charge)
        if refusal is None:
            return None
        return f"privacy budget exhausted: {refusal}"

    def _report_state(self) -> None:
        self.listener.state(self.registry.numbers()[-1], self.budget.epsilon_spent,
                            self.privacy.epsilon_budget, self.privacy.delta)

    def budget_status(self) -> BudgetStatus:
        with self._lock:
            cap = self.budget.cap
            return BudgetStatus(self.budget.epsilon_spent, self.privacy.epsilon_budget,
                                self.privacy.delta, len(self.budget.charges),
                                self.privacy.accountant,
                                None if cap is None else cap.max_rounds)

    # ---- joining and following ----------------------------------------------------

    def join(self, site: int, round_id: int | None, base_version: int, units: int
             ) -> tuple[int | None, int]:
        """Queue `site` for the next cohort (returns (None, serial); pass the serial to
        `leave`) or re-attach it to `round_id` / the round it is in (returns its id)."""
        with self._lock:
            if round_id is not None:
                found = self._find(round_id)
                if found is None:
                    if any(a.round_id == round_id for a in self._state.abandoned):
                        return round_id, 0  # follow() tells it the round was abandoned
                    raise ProtocolError("wrong_round", f"round {round_id} is unknown here "
                                                       "(finished long ago or never run); "
                                                       "join the next cohort")
                if site not in found.cohort:
                    raise ProtocolError("unknown_site", f"site {site} is not in round "
                                                        f"{round_id}'s cohort")
                return round_id, 0
            live = self._round
            if live is not None and site in live.cohort and not self._ended(live, site):
                return live.round_id, 0
            held = self._state.quarantined.get(site)
            if held is not None:
                raise RefusedError("quarantined", f"site {site} is quarantined ({held}); an "
                                                  "operator releases it (Coordinator.release) "
                                                  "after looking")
            latest = self.registry.newest()
            if not 1 <= units <= self.limits.max_units_per_site:
                raise RefusedError("malformed", f"contributing_units={units} must be in 1.."
                                                f"{self.limits.max_units_per_site} (the privacy "
                                                "units summed in the site's delta)")
            if not 0 <= base_version <= latest:
                raise RefusedError("malformed", f"base_version={base_version} is not a published "
                                           f"version (latest is {latest})")
            spent = len(self.budget.charges)
            if self._join_refusal is None or self._join_refusal[0] != spent:
                # The most a round can cost (a full target cohort), once per spent round.
                self._join_refusal = (spent, self._check_budget(
                    self._charge_for(self.cohort_policy.target_size)))
            if self._join_refusal[1]:
                raise RefusedError("budget_exhausted", self._join_refusal[1])
            ticket = self._queue.get(site)
            self._serial += 1
            since = ticket.since if ticket else self.clock()
            self._queue[site] = _Ticket(base_version, units, since, self._serial)
            if self._queue_first is not None:
                self._queue_first = min(self._queue_first, since)
            self._queue_refusals.pop(site, None)
            self._wake((site,))
            self._form_cohort()
            return None, self._serial

    def leave(self, site: int, serial: int) -> None:
        """A queued site hung up (the stream of join `serial`) before a cohort took it."""
        with self._lock:
            ticket = self._queue.get(site)
            if ticket is not None and ticket.serial == serial:
                del self._queue[site]
                self._queue_first = None
                self._wake((site,))

    def waiting(self) -> Waiting:
        with self._lock:
            first = self._first_queued()
            if first is None:
                first = self.clock()
            return Waiting(len(self._queue), self.cohort_policy.target_size,
                           int((first + self.cohort_policy.deadline_s) * 1000))

    def _first_queued(self) -> float | None:
        """When the longest-waiting queued site joined (None: nobody is queued)."""
        if self._queue_first is None:
            self._queue_first = min((t.since for t in self._queue.values()), default=None)
        return self._queue_first

    def follow(self, site: int, round_id: int | None, cursor: int, timeout: float,
               wake: threading.Event | None = None) -> tuple[int | None, list[Event]]:
        """Events for `site` from index `cursor` of `round_id`'s list; with round_id None,
        waits for a cohort to take the site and returns its round and events from 0.
        Waits up to `timeout` for something new, sleeping on its own event (Waiters.wait),
        woken by a change for `site` or by `wake` being set (a JoinRound stream's caller
        hanging up): it may then return no events before `timeout`, and the caller looks
        again. Nothing wakes it on a timer, so a following stream never polls."""
        with self._lock:
            waiters = self._site_waits.get(site)
            if waiters is None:  # one per site that ever followed: bounded by the enrolled
                waiters = self._site_waits[site] = Waiters()
        found: tuple[int | None, list[Event]] = (round_id, [])

        def news() -> bool:
            nonlocal found
            if not found[1]:  # once found, kept: a queue refusal is handed out only once
                with self._lock:
                    found = self._news(site, round_id, cursor)
            return bool(found[1])
        waiters.wait(news, timeout, wake)
        return found

    def _news(self, site: int, round_id: int | None, cursor: int
              ) -> tuple[int | None, list[Event]]:
        """follow's answer now (call with the lock held): the site's round (None: still
        queued) and its events from `cursor`, or from 0 of the round a cohort took it into."""
        if round_id is None:
            if site in self._queue_refusals:
                return None, [Event(0, Stopped(self._queue_refusals.pop(site), False,
                                               RoundPhase.COHORT, DropReason.QUEUE_REFUSED))]
            live = self._round
            if live is not None and site in live.cohort and site not in self._queue:
                round_id, cursor = live.round_id, 0
        if round_id is not None:
            events = self._events_of(site, round_id)
            if len(events) > cursor:
                return round_id, events[cursor:]
        return round_id, []

    def _wake(self, sites: Iterable[int]) -> list[tuple[Waiters, frozenset[object]]]:
        """Wakes whoever follows these sites (call with the lock held): only they can have
        something new, so nobody else re-checks. Returns the waits woken (Waiters.notify)."""
        self._changed.notify_all()
        woken = []
        for site in sites:
            waiters = self._site_waits.get(site)
            if waiters is not None:
                woken.append((waiters, waiters.notify()))
        return woken

    @contextmanager
    def _ending(self) -> Iterator[None]:
        """The lock, for what may end a round (a phase closing: a message or a deadline).
        Once the lock is released, even by an exception, the watchers of a version the
        round published are woken (`_announce`)."""
        try:
            with self._lock:
                yield
        finally:
            self._announce()

    def _announce(self) -> None:
        """Wakes the Watch streams for a version a round published, once the round's own
        work is done (its ledger entry, coordinator.json, each cohort site's outcome) and
        the lock is free, from a thread of its own (`_tell_watchers`): 5,000 watchers woken
        inside `publish` held the round's last steps for the 11 s the wake-ups took to get
        through the GIL (docs/scale.md), and the thread that sets their events is held as
        long, so neither the call that completed the round nor the ticker does it. A
        watcher woken later still sees the version (it re-checks the registry's latest
        number), so nothing between the publication and this is lost. The round's ledger
        entry wakes its StreamLedger followers here too (few: set from this thread)."""
        if self._ledger_news:
            with self._lock:
                news, self._ledger_news = self._ledger_news, False
            if news:
                self.ledger.appended.notify()
        if self._announcing is None:
            return
        with self._lock:  # a round completing in another thread finishes first
            told, self._announcing = self._announcing, None
        if told is not None:
            self._announcer = threading.Thread(target=self._tell_watchers, args=(told,),
                                               name="fleetmind-announce", daemon=True)
            self._announcer.start()

    def _tell_watchers(self, told: list[tuple[Waiters, frozenset[object]]]) -> None:
        """Lets the round's followers, woken by its end, take their outcome (at most
        TELL_COHORT_S), then wakes the version's watchers: the cohort hears first."""
        ends = time.monotonic() + TELL_COHORT_S
        for waiters, woken in told:
            waiters.wait_left(woken, ends - time.monotonic())
        self.registry.published.notify()

    def _events_of(self, site: int, round_id: int) -> list[Event]:
        found = self._find(round_id)
        if found is not None:
            return list(found.events.get(site, ()))
        for abandoned in self._state.abandoned:
            if abandoned.round_id == round_id:
                phase = None if abandoned.phase is None else RoundPhase(abandoned.phase)
                return [Event(round_id, Stopped(abandoned.reason, True, phase,
                                                DropReason.ABANDONED_AT_RESTART))]
        return []

    def _find(self, round_id: int) -> _Round | None:
        if self._round is not None and self._round.round_id == round_id:
            return self._round
        return self._finished.get(round_id)

    @staticmethod
    def _ended(round_: _Round, site: int) -> bool:
        events = round_.events.get(site, [])
        return bool(events) and events[-1].terminal

    # ---- time ---------------------------------------------------------------------

    def tick(self) -> None:
        """Close what is due: a cohort at its deadline, a phase at its deadline."""
        with self._ending():
            self._form_cohort()
            live = self._round
            if live is not None and self.clock() >= live.phase_deadline:
                self._close_phase(live)

    def _form_cohort(self) -> None:
        policy = self.cohort_policy
        if self._round is not None or len(self._queue) < policy.min_size:
            return
        queued_first = self._first_queued()
        if (len(self._queue) < policy.target_size and queued_first is not None
                and self.clock() < queued_first + policy.deadline_s):
            return  # what follows would return too: fewer ready than target, before deadline
        ready = sorted(self._queue, key=lambda s: (self._queue[s].since, s))
        first = self._queue[ready[0]].since
        ready = self._split_suspects(ready)
        if len(ready) < policy.target_size and self.clock() < first + policy.deadline_s:
            return
        if len(ready) < policy.min_size:
            return
        cohort = tuple(sorted(ready[:policy.target_size]))
        charge = self._charge_for(len(cohort))
        refusal = self._check_budget(charge)
        if refusal:
            # Refused before anything ran: the queued sites are told, and nothing is spent.
            refused = list(self._queue)
            for site in refused:
                self._queue_refusals[site] = refusal
            self._queue.clear()
            self._queue_first = None
            self.listener.round_ended(self._state.next_round, "refused", None)
            self._wake(refused)
            return
        self._start_round(cohort, charge)

    # ---- finding the site behind rejected rounds ----------------------------------

    def _split_suspects(self, ready: list[int]) -> list[int]:
        """Group testing after a rejected round: a cohort takes at most half the suspects
        (the sites in every rejected cohort since the last narrowing), so each further
        rejection halves them and a publication clears its half. The ready sites in queue
        order, less the suspects held back; all of them when that leaves too few."""
        suspects = set(self._state.suspects)
        if not suspects & set(ready):
            return ready
        allowed = max(1, len(suspects) // 2)
        picked, held = [], 0
        for site in ready:
            if site in suspects:
                if held >= allowed:
                    continue
                held += 1
            picked.append(site)
        return picked if len(picked) >= self.cohort_policy.min_size else ready

    def _suspect(self, contributors: set[int], reason: str) -> None:
        """A rejected round: the suspects narrow to those in this cohort too (or start as
        it); one left alone is quarantined, refused at join until an operator releases it."""
        suspects = set(self._state.suspects) & contributors or set(contributors)
        if len(suspects) == 1 and self._state.suspects:
            (site,) = suspects
            self._state.quarantined[site] = (
                f"in every rejected cohort since the suspicion began; last: {reason}")
            suspects = set()
        self._state.suspects = sorted(suspects)

    def _clear(self, contributors: set[int]) -> None:
        """A published round: its contributors are beyond suspicion."""
        if self._state.suspects:
            self._state.suspects = sorted(set(self._state.suspects) - contributors)
            self._save()

    def quarantined(self) -> dict[int, str]:
        """Sites refused at join after group testing pinned rejected rounds on them."""
        with self._lock:
            return dict(self._state.quarantined)

    def release(self, site: int) -> bool:
        """An operator's decision: `site` may join again. Returns whether it was held."""
        with self._lock:
            held = self._state.quarantined.pop(site, None) is not None
            self._save()
            return held

    def cohort(self) -> tuple[int, ...]:
        """The live round's cohort (empty between rounds)."""
        with self._lock:
            return self._round.cohort if self._round else ()

    def _latest(self) -> Version:
        """The newest version, which a round merges into (the registry always holds at
        least the genesis version once the aggregator is set up)."""
        latest = self.registry.latest()
        if latest is None:
            raise RuntimeError(f"{self.registry.folder} holds no version: publish version "
                               "0 with genesis() before running rounds")
        return latest

    def _start_round(self, cohort: tuple[int, ...], charge: RoundCharge) -> None:
        policy, privacy = self.cohort_policy, self.privacy
        round_id = self._state.next_round
        latest = self._latest()
        _, b = latest.tensors()
        shapes = {name: tuple(t.shape) for name, t in b.items()}
        degree = secagg_plus_degree(len(cohort), policy.dropout_rate)
        graph = NeighbourGraph.harary(cohort, degree)
        config = RoundConfig(round_id, graph, majority_threshold(graph.min_degree),
                             min(policy.min_size, len(cohort)),
                             sum(math.prod(s) for s in shapes.values()) + 1,  # + weight word
                             policy.ring_bits, self.enrolments.identities(list(cohort)))
        now = self.clock()
        setup = RoundSetup(config, latest.number, privacy.clip_norm, privacy.noise_multiplier,
                           _noise_mode(privacy), _privacy_unit(privacy), len(cohort),
                           privacy.fixed_point_clip, policy.max_size,
                           int((now + policy.phase_deadline_s) * 1000),
                           policy.secure_aggregation, privacy.participation_cap or 0)
        first: PhaseState = ServerAdvertiseKeys(config) if policy.secure_aggregation \
            else ServerPlainInputCollection(config)
        started = time.monotonic()
        live = _Round(setup, charge, first, cohort,
                      {site: [Event(round_id, setup)] for site in cohort}, {},
                      now + policy.phase_deadline_s, shapes, started, started,
                      {site: self._queue[site].units for site in cohort})
        # On disk before any site hears of it: a restart from here abandons it cleanly.
        self._state.next_round = round_id + 1
        self._state.in_flight = InFlight(round_id, first.phase, cohort, charge)
        self._save()
        for site in cohort:
            self._queue.pop(site, None)
        self._queue_first = None
        self._round = live
        self.listener.round_started(round_id, len(cohort))
        self._wake(cohort)

    # ---- the four phases ----------------------------------------------------------

    def _accept(self, round_id: int, site: int, phase: type[_Phase], slot: str, digest: bytes,
                deliver: Callable[[_Phase], None]) -> bytes:
        with self._ending():
            found = self._find(round_id)
            if found is None:
                current = self._round.round_id if self._round else "none"
                raise ProtocolError("wrong_round", f"round {round_id} is not running (current: "
                                                   f"{current})")
            if site not in found.cohort:
                raise ProtocolError("unknown_site", f"site {site} is not in round {round_id}'s "
                                                    "cohort")
            earlier = found.receipts.get((slot, site))
            if earlier is not None:
                if earlier == digest:
                    return digest  # a retry: same answer, no change
                raise ProtocolError("replay", f"site {site} already sent a different {slot} "
                                              f"in round {round_id}")
            if not found.setup.secure_aggregation and phase is not ServerMaskedInputCollection:
                raise ProtocolError("wrong_round", f"round {round_id} runs without secure "
                                                   f"aggregation: it takes no {slot}; upload "
                                                   "the vector unmasked")
            state = found.state
            if not isinstance(state, phase) or found is not self._round:
                raise ProtocolError("wrong_round", f"round {round_id} is past {slot} (now "
                                                   f"{getattr(state, 'phase', 'ended')})")
            deliver(state)
            found.receipts[(slot, site)] = digest
            self._maybe_close(found)
            return digest

    def advertise(self, message: KeyAdvertisement) -> bytes:
        digest = _digest(message.round_id, message.site, message.mask_key, message.share_key,
                         message.signature)
        return self._accept(message.round_id, message.site, ServerAdvertiseKeys, "key "
                            "advertisement", digest, lambda state: state.receive(message))

    def share(self, message: EncryptedShares) -> bytes:
        parts: list[bytes | int] = [message.round_id, message.sender]
        for share in sorted(message.shares, key=lambda s: s.recipient):
            parts += [share.sender, share.recipient, share.ciphertext]
        return self._accept(message.round_id, message.sender, ServerShareKeys, "share bundle",
                            _digest(*parts), lambda state: state.receive(message))

    def check_upload(self, round_id: int, site: int, ring_bits: int, total_bytes: int,
                     payload_sha256: bytes) -> int:
        """Checks an upload's header at its first chunk, before anything is buffered: the
        round runs and collects vectors now, `site` is in its cohort and has not sent a
        different vector, and the ring and size are the round's. Returns the byte count."""
        with self._lock:
            found = self._find(round_id)
            if found is None or found is not self._round:
                raise ProtocolError("wrong_round", f"round {round_id} is not running")
            if site not in found.cohort:
                raise ProtocolError("unknown_site", f"site {site} is not in round {round_id}'s "
                                                    "cohort")
            earlier = found.receipts.get(("masked vector", site))
            if earlier is not None and earlier != payload_sha256:
                raise ProtocolError("replay", f"site {site} already sent a different masked "
                                              f"vector in round {round_id}")
            if earlier is None and not self._collecting(found):
                raise ProtocolError("wrong_round", f"round {round_id} is not collecting vectors "
                                                   f"(now {getattr(found.state, 'phase', '?')})")
            config = found.setup.config
            expected = config.vector_length * config.ring_bits // 8
            if total_bytes > expected:
                raise RefusedError("too_large", f"site {site}: upload announces {total_bytes} "
                                                f"bytes; round {round_id}'s vector is {expected}")
            if ring_bits != config.ring_bits or total_bytes != expected:
                raise RefusedError("malformed", f"site {site}: upload header ring_bits="
                                                f"{ring_bits}, total_bytes={total_bytes}; round "
                                                f"{round_id} is {config.ring_bits}-bit, "
                                                f"{expected} bytes")
            return expected

    @staticmethod
    def _collecting(found: _Round) -> bool:
        return isinstance(found.state, ServerMaskedInputCollection | ServerPlainInputCollection)

    def collecting(self, round_id: int) -> bool:
        """Whether `round_id` is the live round and still takes vectors: an upload still
        arriving after this turns false is cancelled (uploads end with their phase)."""
        with self._lock:
            found = self._find(round_id)
            return found is not None and found is self._round and self._collecting(found)

    def submit(self, message: MaskedInput, payload_sha256: bytes) -> bytes:
        def deliver(state: ServerMaskedInputCollection) -> None:
            if isinstance(state, ServerPlainInputCollection):
                live = self._round  # _accept checked that the message's round is this one
                if live is None:
                    raise ProtocolError("wrong_round", f"round {message.round_id} is not "
                                                       "running")
                self._check_plain_vector(live, message)
            state.receive(message)
        return self._accept(message.round_id, message.site, ServerMaskedInputCollection,
                            "masked vector", payload_sha256, deliver)

    def _check_plain_vector(self, live: _Round, message: MaskedInput) -> None:
        """Without secure aggregation each vector is seen, so each is checked alone: its
        weight in [min_site_weight, 1] and its delta within the site's clip and noise. (Under
        secure aggregation only the sum can be checked: `_check_aggregate`.)"""
        delta_code, weight_code = self.round_codes(live.setup)
        ring = np.asarray(message.masked_vector)
        weight = float(weight_code.decode_sum(ring[-1:])[0])
        slack = 1 / weight_code.scale
        if not self.limits.min_site_weight - slack <= weight <= 1 + slack:
            raise ProtocolError("malformed", f"site {message.site}: weight {weight:.6g} is not "
                                             f"in [{self.limits.min_site_weight}, 1]")
        delta = delta_code.decode_sum(ring[:-1])
        bound = self._bounds(live.setup).mean_delta_bound(
            1, weight, live.setup.config.vector_length - 1, self._units(live, (message.site,)))
        norm = float(np.linalg.norm(delta)) / weight
        if not norm <= bound:
            raise ProtocolError("malformed", f"site {message.site}: delta norm {norm:.6g} "
                                             f"exceeds the round's bound {bound:.6g}")

    def unmask(self, message: UnmaskShares) -> bytes:
        parts: list[bytes | int] = [message.round_id, message.site]
        for kind, shares in ((1, message.self_mask_shares), (2, message.mask_key_shares)):
            for owner, share in sorted(shares.items()):
                parts += [kind, owner, share.to_bytes()]
        return self._accept(message.round_id, message.site, ServerUnmasking, "unmask shares",
                            _digest(*parts), lambda state: state.receive(message))

    # ---- phase transitions --------------------------------------------------------

    def _maybe_close(self, live: _Round) -> None:
        if not live.state.pending():
            self._close_phase(live)

    def _close_phase(self, live: _Round) -> None:
        """Close the phase (missing sites count as dropped) and send what comes next."""
        before = live.state
        if isinstance(before, ServerCompleted | ServerAborted):
            raise RuntimeError(f"round {live.round_id} has ended: it has no phase to close")
        missed = len(before.pending())  # asked before close(): it moves the state on
        state = before.close()
        live.state = state
        live.phase_deadline = self.clock() + self.cohort_policy.phase_deadline_s
        now = time.monotonic()
        self.listener.phase_closed(live.round_id, before.phase, now - live.phase_started,
                                   missed)
        live.phase_started = now
        if isinstance(state, ServerAborted):
            self._stop(self._stopped_entry(
                live.round_id, "aborted", state.phase, drop_reason=state.drop_reason,
                receipts=self._receipts(live, live.cohort)))
            self._end(live, Stopped(f"round aborted in {state.phase}: {state.reason}", True,
                                    RoundPhase(state.phase), state.drop_reason))
            return
        if isinstance(state, ServerCompleted):
            self._complete(live, state)
            return
        onward: Mapping[int, AdvertisedKeys | SharesForSite | UnmaskRequest]
        if isinstance(state, ServerShareKeys | ServerMaskedInputCollection):
            onward = state.to_sites
        else:  # ServerUnmasking
            onward = {site: state.request for site in state.request.survivors}
        for site in live.cohort:
            if site in onward:
                live.events[site].append(Event(live.round_id, onward[site]))
            elif not self._ended(live, site):
                live.events[site].append(Event(live.round_id, Stopped(
                    f"site {site} missed {before.phase} and left round {live.round_id}", True,
                    RoundPhase(before.phase), DropReason.MISSED_DEADLINE, site_only=True)))
        assert self._state.in_flight is not None
        self._state.in_flight.phase = state.phase
        self._save()
        self._wake(live.cohort)

    def _end(self, live: _Round, outcome: Finished | Stopped) -> None:
        for site in live.cohort:
            if not self._ended(live, site):
                live.events[site].append(Event(live.round_id, outcome))
        self._state.in_flight = None
        self._save()
        self._finished[live.round_id] = live
        for old in sorted(self._finished)[:-KEEP_FINISHED]:
            del self._finished[old]
        self._round = None
        published = isinstance(outcome, Finished)
        self.listener.round_ended(live.round_id, "published" if published else "aborted",
                                  time.monotonic() - live.started,
                                  outcome.cohort_size if isinstance(outcome, Finished) else 0)
        if published:
            self._report_state()
        told = self._wake(live.cohort)
        if self._announcing is not None:  # its version's watchers hear after these sites
            self._announcing = told
        self._form_cohort()  # sites queued meanwhile may make the next cohort now

    def _complete(self, live: _Round, result: ServerCompleted) -> None:
        try:
            version, dropped = self._publish(live, result)
        except AggregateRejectedError as error:
            self._reject(live, result, error)
            self._end(live, Stopped(f"round {live.round_id} rejected: {error}", True,
                                    RoundPhase.MERGE, DropReason.UPDATE_REJECTED))
            return
        except (ValueError, ArithmeticError) as error:
            # Nothing was published, so nothing was spent; the round runs again.
            self._stop(self._stopped_entry(live.round_id, "merge_failed",
                                           RoundPhase.MERGE.value,
                                           contributors=len(result.contributors),
                                           receipts=self._receipts(live,
                                                                   result.contributors)))
            self._end(live, Stopped(f"round {live.round_id} could not be merged: {error}", True,
                                    RoundPhase.MERGE, DropReason.MERGE_FAILED))
            return
        self._clear(set(result.contributors))
        self._end(live, Finished(version.number, len(result.contributors), dropped))

    @staticmethod
    def round_codes(setup: RoundSetup) -> tuple[FixedPoint, FixedPoint]:
        """The payload codes of the round, by the one definition sites use too."""
        return encoding_codes(setup.clip_norm, setup.noise_multiplier, setup.noise_mode,
                              setup.privacy_unit, setup.expected_cohort,
                              setup.fixed_point_clip, setup.cohort_max,
                              setup.config.ring_bits)

    def _bounds(self, setup: RoundSetup) -> AggregateBounds:
        """What an honest sum of this round can hold (aggregation.aggregate_check): the
        round's clip, codes and noise, and the aggregator's limits."""
        delta_code, weight_code = self.round_codes(setup)
        return AggregateBounds(
            setup.clip_norm, setup.fixed_point_clip, delta_code, weight_code,
            DPConfig(setup.clip_norm, setup.noise_multiplier, setup.privacy_unit,
                     setup.noise_mode, setup.expected_cohort),
            self.limits.min_site_weight, self.limits.noise_norm_multiple)

    def _units(self, live: _Round, sites: tuple[int, ...]) -> int:
        """The most privacy units any of `sites` declared at join (1 if none)."""
        return max((live.units.get(site, 1) for site in sites), default=1)

    def _check_aggregate(self, live: _Round, contributors: tuple[int, ...],
                         weighted: np.ndarray, weight_sum: float) -> None:
        """Refuses (AggregateRejectedError) an unmasked sum that honest sites could not have
        made: `AggregateBounds.check` (weight sum, finiteness, the mean delta's norm;
        docs/hardening.md, "The aggregate check")."""
        self._bounds(live.setup).check(weighted, weight_sum, len(contributors),
                                       self._units(live, contributors))

    def _reject(self, live: _Round, result: ServerCompleted,
                error: AggregateRejectedError) -> None:
        """Records a rejected aggregate in coordinator.json (newest last) and the ledger. The
        aggregator saw the (noised) sum, so the round's privacy charge is spent though
        nothing was published: the accountant must cover what the aggregator observed."""
        reason = str(error)
        receipts = self._receipts(live, result.contributors)
        self._state.rejected.append(Rejected(
            live.round_id, reason, tuple(sorted(result.contributors)), receipts,
            int(self.clock() * 1000)))
        self._state.rejected = self._state.rejected[-KEEP_REJECTED:]
        held = set(self._state.quarantined)
        self._suspect(set(result.contributors), reason)
        self._state.spent.append(Spent(live.round_id, live.charge))
        self.budget.charges.append(live.charge)
        self._stop(self._stopped_entry(
            live.round_id, "rejected", RoundPhase.MERGE.value, error=error,
            contributors=len(result.contributors), receipts=receipts,
            epsilon_round=epsilon_of([live.charge], self.privacy.delta,
                                     _accountant(self.privacy)),
            quarantined=tuple(sorted(set(self._state.quarantined) - held))))
        self.listener.refused("aggregate_rejected")
        self._report_state()

    @staticmethod
    def _receipts(live: _Round, sites: Iterable[int]) -> tuple[str, ...]:
        """sha256 (hex, sorted) of the masked vectors `sites` uploaded: what each outbox
        recorded."""
        return tuple(sorted({live.receipts[("masked vector", site)].hex()
                             for site in sites if ("masked vector", site) in live.receipts}))

    def _stopped_entry(self, round_id: int, outcome: str, phase: str, *,
                       error: AggregateRejectedError | None = None,
                       drop_reason: DropReason | None = None, contributors: int = 0,
                       receipts: tuple[str, ...] = (), epsilon_round: float = 0.0,
                       quarantined: tuple[int, ...] = ()) -> StoppedRound:
        """The ledger entry of a round that ended without a version (records.STOP_OUTCOMES),
        with the budget's total as it stands (after this round's charge, if it spent)."""
        return StoppedRound(
            round_id=round_id, outcome=outcome, phase=phase,
            check=None if error is None else error.check,
            measured=None if error is None else error.measured,
            allowed=None if error is None else error.allowed,
            contributors=contributors, version=self.registry.newest(),
            epsilon_round=epsilon_round, epsilon_total=self.budget.epsilon_spent,
            delta=self.privacy.delta, payload_sha256s=receipts, quarantined=quarantined,
            privacy_unit=self.privacy.privacy_unit,
            participation_cap=self.privacy.participation_cap,
            drop_reason=None if drop_reason is None else drop_reason.value)

    def _stop(self, entry: StoppedRound) -> None:
        """Ends the round in flight in coordinator.json, saving `entry` with the state it
        ends in the same write, then appends it to the ledger: a crash between the two loses
        nothing (a restart appends it), and a restart never abandons a round that ended."""
        self._state.in_flight = None
        self._state.stopped = [*self._state.stopped, entry][-KEEP_FINISHED:]
        self._save()
        self._append_to_ledger(entry)

    def _append_to_ledger(self, entry: LedgerRecord) -> None:
        """Appends `entry`; its StreamLedger followers are woken once the round is done and
        the lock free (`_announce`), as a version's watchers are, not inside the round."""
        self.ledger.append(entry, notify=False)
        self._ledger_news = True

    def _ledger_stopped_entries(self) -> None:
        """At start: the saved entries of stopped rounds the ledger does not hold yet (the
        aggregator stopped between saving one and appending it), appended in order."""
        head = self.ledger.head()
        last = -1 if head is None else head.record.round_id
        for entry in self._state.stopped:
            if entry.round_id > last:
                self._append_to_ledger(entry)
                last = entry.round_id

    def rejected(self) -> list[dict]:
        """The last KEEP_REJECTED rejected aggregates (round, reason, contributors, receipts)."""
        with self._lock:
            return [r.to_json() for r in self._state.rejected]

    def _publish(self, live: _Round, result: ServerCompleted) -> tuple[Version, tuple[int, ...]]:
        setup, privacy = live.setup, self.privacy
        delta_code, weight_code = self.round_codes(setup)
        weighted, weight_sum = open_secagg_sum(np.asarray(result.cohort_sum), live.shapes,
                                               delta_code, weight_code)
        dp = _dp_config(privacy, setup.expected_cohort)
        # Central mode: the trusted aggregator noises the sum before anything is derived
        # from it (a no-op for distributed and local noise, which the sites added).
        noised = np.asarray(noise_for_aggregator(flatten(weighted, live.shapes), dp),
                            dtype=np.float64)
        self._check_aggregate(live, tuple(sorted(result.contributors)), noised, weight_sum)
        weighted = unflatten(noised, live.shapes)
        parent = self._latest()
        _, b = parent.tensors()
        units = sum(live.units.get(site, 1) for site in result.contributors)
        step = cohort_step(privacy.server_learning_rate, units, privacy.server_step_units)
        new_b, _ = exact_merge(b, weighted, weight_sum, FedAvg(step))
        check_merged(new_b)
        dropped = tuple(sorted(set(live.cohort) - set(result.contributors)))
        epsilon_total = self.budget.epsilon_after(live.charge)
        epsilon_round = epsilon_of([live.charge], privacy.delta, _accountant(privacy))
        flight = self._state.in_flight
        assert flight is not None
        flight.outcome = Outcome(len(result.contributors), len(dropped), epsilon_round,
                                 epsilon_total, self._receipts(live, result.contributors),
                                 units=units, server_step=float(step),
                                 server_learning_rate=privacy.server_learning_rate,
                                 server_step_units=privacy.server_step_units)
        self._save()  # so a crash after publishing still writes the ledger at restart
        # Its watchers are woken once the round is done and the lock free (`_ending`).
        version = self.registry.publish(new_b, Release(
            round_id=live.round_id, cohort_size=len(result.contributors),
            clip_norm=privacy.clip_norm, noise_multiplier=privacy.noise_multiplier,
            noise_mode=_noise_mode(privacy), epsilon=epsilon_total, delta=privacy.delta,
            secure_aggregation=setup.secure_aggregation), notify=False)
        self._announcing = []  # `_end` names the followers to tell first
        self._record_published(version, flight)
        return version, dropped

    # ---- for the read-only services ------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Waits (up to `timeout`) until `predicate()` holds, re-checked at every change of
        the queue or a round (for tests and tools: a service waits for its own thing)."""
        with self._lock:
            return self._changed.wait_for(predicate, timeout)

    def wait_for_version(self, after: int, timeout: float,
                         wake: threading.Event | None = None) -> bool:
        """Waits (up to `timeout`) for a version newer than `after`; woken only by a
        publication or by `wake` (Waiters.wait). Returns whether there is one."""
        def newer() -> bool:
            latest = self.registry.latest_number()
            return latest is not None and latest > after
        return self.registry.published.wait(newer, timeout, wake)

    def wait_for_ledger(self, index: int, timeout: float,
                        wake: threading.Event | None = None) -> bool:
        """Waits (up to `timeout`) until the ledger holds entry `index`; woken only by an
        append or by `wake`. Returns whether it does."""
        def appended() -> bool:
            head = self.ledger.head()
            return head is not None and head.index >= index
        return self.ledger.appended.wait(appended, timeout, wake)

    def current_round(self) -> int | None:
        with self._lock:
            return self._round.round_id if self._round else None
