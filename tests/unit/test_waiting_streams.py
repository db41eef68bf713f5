"""Streams that wait for news sleep until it comes or their caller leaves, and never poll.

JoinRound, driven through the service's handler with a stand-in for grpc's context: a
follower in a round or in the queue ends as soon as its caller hangs up, and it is not
woken on a timer in between (its queue heartbeat and queue lifetime are kept). A round's
version wakes its watchers only once the round is done: its ledger entry written,
coordinator.json saved, every cohort site told, and the coordinator's lock free; a failure
between the publication and that still wakes them. A round's ledger entry, published or
stopped, wakes the StreamLedger followers only once the round is done, too."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
from support.coordinator import Clock, Site, open_coordinator

from fleetmind.aggregation.records import StoppedRound
from fleetmind.protos.fleetmind.v1 import fleet_pb2
from fleetmind.server import service
from fleetmind.server.coordinator import Coordinator, Finished, RoundListener
from fleetmind.server.coordinator_state import STATE_FILE
from fleetmind.server.limits import ServerLimits
from fleetmind.server.metrics import ServerMetrics
from fleetmind.server.versions import Release
from fleetmind.server.waiters import Waiters

STEPS = ("advertise", "share", "submit", "unmask")


def run_to_the_last_unmask(sites: list[Site]) -> None:
    """Every site joins and takes every step of the round but the last site's unmask."""
    for s in sites:
        s.join()
    for step in STEPS[:-1]:
        for s in sites:
            getattr(s, step)()
    for s in sites[:-1]:
        s.unmask()


@pytest.fixture
def fleet(tmp_path: Path):
    coordinator = open_coordinator(tmp_path / "data", Clock())  # cohort: 3 to 4 sites
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(4)]
    yield coordinator, sites, tmp_path / "data"
    for stream in Stream.opened:  # a failed test's streams must not outlive it
        stream.context.hang_up()
        stream.thread.join(10.0)
    Stream.opened.clear()
    coordinator.ledger.close()


class Context:
    """grpc's servicer context, as much of it as JoinRound uses: callbacks run when the
    caller hangs up (`hang_up`), as grpc runs them when a call ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list = []
        self.active = True

    def add_callback(self, callback) -> bool:
        with self._lock:
            if not self.active:
                return False
            self._callbacks.append(callback)
            return True

    def is_active(self) -> bool:
        return self.active

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"JoinRound aborted {code}: {details}")

    def hang_up(self) -> None:
        with self._lock:
            self.active = False
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class Stream:
    """One JoinRound of `site` through FleetService's handler, read by its own thread;
    counts the coordinator.follow calls it makes."""

    opened: ClassVar[list[Stream]] = []

    def __init__(self, coordinator: Coordinator, site: int,
                 limits: ServerLimits | None = None) -> None:
        self.follows = 0
        follow = coordinator.follow

        def counted(*args, **kwargs):
            self.follows += 1
            return follow(*args, **kwargs)
        coordinator.follow = counted  # type: ignore[method-assign]
        fleet = service.FleetService(coordinator, service._Guard(coordinator.enrolments,
                                                                  mtls=False),
                                     b"", ServerMetrics(), limits)
        self.context = Context()
        self.events: list[fleet_pb2.RoundEvent] = []
        self.ended: float | None = None
        request = fleet_pb2.JoinRoundRequest(site=site, contributing_units=1)
        self.thread = threading.Thread(target=self._read, daemon=True,
                                       args=(fleet._join_round(request, self.context),))
        Stream.opened.append(self)
        self.thread.start()

    def _read(self, events) -> None:
        for event in events:
            self.events.append(event)
        self.ended = time.monotonic()

    def kinds(self) -> list[str]:
        return [e.WhichOneof("event") for e in self.events]

    def wait_for(self, kind: str, timeout: float = 10.0) -> None:
        ends = time.monotonic() + timeout
        while kind not in self.kinds():
            assert time.monotonic() < ends, f"no {kind} event: {self.kinds()}"
            time.sleep(0.01)

    def hang_up(self) -> float:
        """Hangs up; the seconds until the handler ended."""
        left = time.monotonic()
        self.context.hang_up()
        self.thread.join(10.0)
        assert self.ended is not None, "the stream did not end after its caller left"
        return self.ended - left


def test_a_follower_in_a_round_sleeps_until_its_caller_leaves(fleet) -> None:
    """Nothing new in the round for 1.2 s: the stream follows once and sleeps (a 1-s poll
    followed twice), and ends at once when its caller hangs up."""
    coordinator, sites, _ = fleet
    for s in sites[:3]:
        s.join()
    stream = Stream(coordinator, sites[3].id)  # the fourth joins: the cohort starts
    stream.wait_for("config")
    time.sleep(0.2)  # into its next follow
    follows = stream.follows
    time.sleep(1.2)
    assert stream.follows == follows  # still asleep in the same follow
    assert stream.hang_up() < 0.5
    assert stream.kinds() == ["waiting", "config"]


def test_a_queued_follower_sleeps_until_its_heartbeat_or_its_caller_leaves(fleet) -> None:
    coordinator, sites, _ = fleet
    stream = Stream(coordinator, sites[0].id)  # alone: no cohort forms
    stream.wait_for("waiting")
    time.sleep(1.2)  # the next heartbeat is 5 s away
    assert stream.follows == 1
    assert stream.hang_up() < 0.5
    assert stream.kinds() == ["waiting"]
    assert coordinator.waiting().ready_sites == 0  # it left the queue


def test_a_queued_follower_still_hears_heartbeats_and_the_end_of_its_wait(
        fleet, monkeypatch) -> None:
    coordinator, sites, _ = fleet
    monkeypatch.setattr(service, "WAITING_EVERY_S", 0.1)
    started = time.monotonic()
    stream = Stream(coordinator, sites[0].id, ServerLimits(stream_max_s=0.45))
    stream.thread.join(10.0)
    assert stream.ended is not None
    # Woken for each heartbeat and then at the end of its wait, not a poll interval later.
    assert stream.ended - started < 0.9
    kinds = stream.kinds()
    assert kinds[-1] == "aborted" and set(kinds[:-1]) == {"waiting"} and len(kinds) >= 4
    aborted = stream.events[-1].aborted
    assert (aborted.retry, aborted.phase, aborted.drop_reason, aborted.site_only) == (
        True, fleet_pb2.ROUND_PHASE_COHORT, fleet_pb2.DROP_REASON_COHORT_WAIT_EXPIRED, True)
    assert coordinator.waiting().ready_sites == 0


def test_a_follower_hears_every_event_of_its_round_and_its_end(fleet) -> None:
    """Woken by each phase of its round (the site answers through its own follow)."""
    coordinator, sites, _ = fleet
    for s in sites[:3]:
        s.join()
    stream = Stream(coordinator, sites[3].id)
    stream.wait_for("config")
    for step in STEPS:
        for s in sites:
            getattr(s, step)()
    stream.thread.join(10.0)
    assert stream.kinds() == ["waiting", "config", "advertised_keys", "shares_for_site",
                              "unmask_request", "completed"]
    assert stream.events[-1].completed.version == 1


def test_a_follower_that_misses_a_phase_hears_its_end_at_the_deadline(fleet) -> None:
    coordinator, sites, _ = fleet
    for s in sites[:3]:
        s.join()
    stream = Stream(coordinator, sites[3].id)  # never answers
    stream.wait_for("config")
    for s in sites[:3]:
        s.advertise()
    coordinator.clock.now += 31  # type: ignore[attr-defined]  # past the phase's deadline
    coordinator.tick()
    stream.thread.join(10.0)
    assert stream.kinds() == ["waiting", "config", "aborted"]
    assert stream.events[-1].aborted.site_only


class Snapshot(Waiters):
    """The version waiters, recording what was done when they were notified."""

    def __init__(self, coordinator: Coordinator, sites: list[Site], data: Path) -> None:
        super().__init__()
        self.coordinator, self.sites, self.data = coordinator, sites, data
        self.seen: list[dict] = []
        self.taken: list[int] = []  # sites whose follower took its Finished (a test fills it)

    def notify(self) -> None:
        taken = list(self.taken)  # before `outcome` below follows too
        free: list[bool] = []
        probe = threading.Thread(
            target=lambda: free.append(self._try_lock()))  # another thread: the RLock is
        probe.start()                                     # reentrant in this one
        probe.join()
        self.seen.append({
            "ledgered": self.coordinator.ledger.find_round(1) is not None,
            "saved": json.loads((self.data / STATE_FILE).read_bytes())["in_flight"] is None,
            "told": [isinstance(s.outcome(), Finished) for s in self.sites],
            "ended": list(self.coordinator.listener.ended),  # type: ignore[attr-defined]
            "lock_free": free == [True], "taken": taken})
        super().notify()

    def _try_lock(self) -> bool:
        if self.coordinator._lock.acquire(timeout=0.5):
            self.coordinator._lock.release()
            return True
        return False


class Ended(RoundListener):
    def __init__(self) -> None:
        self.ended: list[str] = []

    def round_ended(self, round_id, outcome, seconds, contributors=0) -> None:
        self.ended.append(outcome)


def test_watchers_are_woken_only_once_the_round_is_done(fleet) -> None:
    """...and the lock is free, by a thread of their own: the call that completed the
    round returns first."""
    coordinator, sites, data = fleet
    coordinator.listener = Ended()
    coordinator.registry.published = seen = Snapshot(coordinator, sites, data)
    for s in sites:
        s.join()
    for step in STEPS:
        for s in sites:
            getattr(s, step)()
    assert coordinator._announcer is not None
    coordinator._announcer.join(10.0)
    assert seen.seen == [{"ledgered": True, "saved": True, "told": [True] * 4,
                          "ended": ["published"], "lock_free": True, "taken": []}]
    assert coordinator.wait_for_version(0, 0)


def test_ledger_followers_are_woken_only_once_the_round_is_done(fleet) -> None:
    """A StreamLedger follower asleep for the round's entry wakes after the round is done
    and the lock free (it was woken inside the round, at the append, before)."""
    coordinator, sites, data = fleet
    coordinator.listener = Ended()
    coordinator.ledger.appended = seen = Snapshot(coordinator, sites, data)
    follower_saw: list[bool] = []
    follower = threading.Thread(
        target=lambda: follower_saw.append(coordinator.wait_for_ledger(0, 30.0)))
    follower.start()
    ends = time.monotonic() + 10
    while not seen._waiting:
        assert time.monotonic() < ends, "the follower never slept"
        time.sleep(0.01)
    for s in sites:
        s.join()
    for step in STEPS:
        for s in sites:
            getattr(s, step)()
    assert seen.seen == [{"ledgered": True, "saved": True, "told": [True] * 4,
                          "ended": ["published"], "lock_free": True, "taken": []}]
    follower.join(5.0)
    assert follower_saw == [True]


def test_a_stopped_rounds_entry_wakes_the_ledger_followers_after_the_round(fleet) -> None:
    coordinator, sites, data = fleet
    coordinator.listener = Ended()
    coordinator.ledger.appended = seen = Snapshot(coordinator, sites, data)
    for s in sites:
        s.join()
    for s in sites[:2]:  # two of four advertise: too few for the threshold at the deadline
        s.advertise()
    assert seen.seen == []
    coordinator.clock.now += 31  # type: ignore[attr-defined]  # past the phase's deadline
    coordinator.tick()
    assert len(seen.seen) == 1
    assert seen.seen[0]["ledgered"] and seen.seen[0]["saved"] and seen.seen[0]["lock_free"]
    assert seen.seen[0]["ended"] == ["aborted"]
    assert isinstance(coordinator.ledger.head().record, StoppedRound)


def test_the_rounds_followers_take_their_outcome_before_the_watchers_wake(fleet) -> None:
    """Each site's JoinRound follower, asleep when the round ends, has its outcome in hand
    before the version's watchers are woken: they would hold it up (the GIL) otherwise."""
    coordinator, sites, data = fleet
    coordinator.listener = Ended()
    coordinator.registry.published = seen = Snapshot(coordinator, sites, data)
    news = coordinator._news

    def recorded(site, round_id, cursor):
        found = news(site, round_id, cursor)
        if any(isinstance(e.payload, Finished) for e in found[1]):
            time.sleep(0.1)  # a follower slow to get the lock and the GIL
            seen.taken.append(site)
        return found
    coordinator._news = recorded  # type: ignore[method-assign]
    run_to_the_last_unmask(sites)
    followers = [threading.Thread(target=coordinator.follow, args=(s.id, 1, 4, 30.0))
                 for s in sites]  # 4 events each so far: setup, keys, shares, unmask request
    for follower in followers:
        follower.start()
    ends = time.monotonic() + 10
    while sum(len(w._waiting) for w in coordinator._site_waits.values()) < len(sites):
        assert time.monotonic() < ends, "the followers never slept"
        time.sleep(0.01)
    sites[-1].unmask()  # the round ends
    assert coordinator._announcer is not None
    coordinator._announcer.join(10.0)
    for follower in followers:
        follower.join(10.0)
    assert sorted(seen.seen[0]["taken"]) == sorted(s.id for s in sites)


def test_a_failure_after_the_publication_still_wakes_the_watchers(fleet, monkeypatch) -> None:
    """The ledger append fails after the version is on disk: the watchers are woken all
    the same, and a Watch finds the version."""
    coordinator, sites, _ = fleet
    woken = threading.Event()
    waiter = threading.Thread(
        target=lambda: woken.set() if coordinator.wait_for_version(0, 60.0) else None)
    waiter.start()

    def fails(*args) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(coordinator, "_record_published", fails)
    run_to_the_last_unmask(sites)
    with pytest.raises(OSError, match="disk full"):
        sites[-1].unmask()
    waiter.join(30.0)
    assert woken.is_set()
    assert coordinator.registry.latest_number() == 1


def test_a_publication_notifies_unless_told_not_to(fleet) -> None:
    coordinator, _, _ = fleet
    registry = coordinator.registry
    notified: list[int] = []
    registry.published.notify = lambda: notified.append(  # type: ignore[method-assign]
        registry.newest())
    _, b = registry.latest().tensors()  # type: ignore[union-attr]
    release = Release(round_id=1, cohort_size=3, clip_norm=1.0, noise_multiplier=1.0,
                      noise_mode="distributed", epsilon=1.0, delta=1e-5)
    registry.publish({m: t + 0.01 for m, t in b.items()}, release, notify=False)
    assert notified == [] and registry.latest_number() == 1
    registry.publish({m: np.asarray(t) + 0.02 for m, t in b.items()},
                     dataclasses.replace(release, round_id=2))
    assert notified == [2]


def test_a_notifier_can_wait_for_the_callers_it_woke_to_look() -> None:
    waiters = Waiters()
    looked = threading.Event()
    checks: list[bool] = []

    def ready() -> bool:
        checks.append(True)
        if len(checks) > 1:  # the re-check after the wake-up, slow
            looked.wait(10.0)
        return False
    caller = threading.Thread(target=waiters.wait, args=(ready, 60.0))
    caller.start()
    ends = time.monotonic() + 10
    while not checks:
        assert time.monotonic() < ends
        time.sleep(0.01)
    woken = waiters.notify()
    assert len(woken) == 1
    assert not waiters.wait_left(woken, 0.2)  # still looking
    looked.set()
    assert waiters.wait_left(woken, 10.0)
    caller.join(10.0)
    assert waiters.wait_left(waiters.notify(), 0.0)  # nobody waits: nothing to wait for
