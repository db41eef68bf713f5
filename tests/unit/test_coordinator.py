"""The coordinator driven directly, without gRPC: sites are the aggregation library's site
states fed through `join`/`follow`/`advertise`/`share`/`submit`/`unmask`, and time is a
clock the test moves. Covers a round that publishes, a site missing each phase (the
outcome's phase, drop reason and site_only), whole-round aborts, the typed state in
coordinator.json across a restart, the participation cap, who is woken by what (no
thundering herd), the signed ledger entry of a rejected round, and the units and server
step a published round's entry records (written at restart too, after a crash)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from support.coordinator import PHASE_S, PRIVACY, Clock, Site, open_coordinator

from fleetmind.aggregation.merge import cohort_step
from fleetmind.aggregation.records import RoundRecord, StoppedRound
from fleetmind.aggregation.secagg import DropReason, RoundPhase
from fleetmind.server.config import ConfigError, PrivacyPolicy
from fleetmind.server.coordinator import Coordinator, Finished, RefusedError, Stopped
from fleetmind.server.coordinator_state import STATE_FILE, CoordinatorState, Outcome
from fleetmind.server.waiters import Waiters


@pytest.fixture
def fleet(tmp_path: Path):
    clock = Clock()
    coordinator = open_coordinator(tmp_path / "data", clock)
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(4)]
    yield coordinator, clock, sites
    coordinator.ledger.close()


def deadline_passes(coordinator: Coordinator, clock: Clock) -> None:
    clock.now += PHASE_S + 1
    coordinator.tick()


STEPS = ("advertise", "share", "submit", "unmask")
MISSED = {"advertise": RoundPhase.ADVERTISE_KEYS, "share": RoundPhase.SHARE_KEYS,
          "submit": RoundPhase.MASKED_INPUT_COLLECTION}


def forged_round(sites: list[Site]) -> None:
    """One round in which the first site forges its weight word: the sum is rejected."""
    for s in sites:
        s.join()
    for step in STEPS:
        for s in sites:
            s.submit(forge_weight=s is sites[0]) if step == "submit" else getattr(s, step)()


def run(coordinator: Coordinator, clock: Clock, sites: list[Site],
        skip: tuple[Site, str] | None = None) -> None:
    """One round; `skip` = (site, step): that site stops answering from that step on."""
    for s in sites:
        s.join()
    gone: set[int] = set()
    for step in STEPS:
        for s in sites:
            if skip is not None and s is skip[0] and step == skip[1]:
                gone.add(s.id)
            if s.id not in gone:
                getattr(s, step)()
        if skip is not None and step == skip[1] and coordinator.current_round() is not None:
            deadline_passes(coordinator, clock)  # the phase closes without the quiet site
        if coordinator.current_round() is None:
            return


def test_a_round_of_four_sites_publishes_version_1(fleet) -> None:
    coordinator, clock, sites = fleet
    run(coordinator, clock, sites)
    outcomes = {s.id: s.outcome() for s in sites}
    assert set(outcomes.values()) == {Finished(1, 4, ())}
    assert coordinator.registry.numbers() == [0, 1]
    assert coordinator.ledger.head().record.round_id == 1
    assert coordinator.budget_status().rounds == 1


@pytest.mark.parametrize("units, step", [(1, 3.0 * 2 / 4), (2, 3.0 * 2 / 8)])
def test_the_server_step_shrinks_with_the_units_a_round_sums(tmp_path: Path, units: int,
                                                             step: float) -> None:
    """server_step_units 2 and a rate of 3: four sites of 1 unit each (4 units) step
    3 x 2/4, of 2 units each (8) 3 x 2/8. The published B is that step times the
    mean of the sites' deltas, within the fixed-point code's resolution."""
    import numpy as np

    from fleetmind.aggregation.merge import flatten

    policy = PrivacyPolicy(**{**PRIVACY.__dict__, "server_learning_rate": 3.0,
                              "server_step_units": 2})
    coordinator = open_coordinator(tmp_path / "data", Clock(), privacy=policy)
    try:
        sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(4)]
        for s in sites:
            s.join(units)
        for name in STEPS:
            for s in sites:
                getattr(s, name)()
        assert coordinator.registry.numbers() == [0, 1]
        shapes = {n: d.shape for n, d in sites[0].delta.items()}
        mean = np.mean([flatten(s.delta, shapes) for s in sites], axis=0)
        _, b = coordinator.registry.get(1).tensors()
        np.testing.assert_allclose(flatten(b, shapes), step * mean, atol=1e-4)
        # The signed ledger says how far the round moved the model: the units the sites
        # declared, summed, and the step cohort_step gave for them.
        entry = coordinator.ledger.head()
        record = entry.record
        assert isinstance(record, RoundRecord)
        assert record.units == 4 * units
        assert record.server_step == cohort_step(3.0, 4 * units, 2) == pytest.approx(step)
        assert b'"units":%d' % (4 * units) in entry.body and b'"server_step":' in entry.body
        # ... and the rule that gave it, so an auditor recomputes the step from the entry.
        assert (record.server_learning_rate, record.server_step_units) == (3.0, 2)
        assert b'"server_learning_rate":3.0' in entry.body
        assert b'"server_step_units":2' in entry.body
        assert coordinator.ledger.verify() == entry.hash
    finally:
        coordinator.ledger.close()


def test_an_unscaled_round_records_its_units_and_the_configured_rate(fleet) -> None:
    coordinator, clock, sites = fleet
    run(coordinator, clock, sites)
    record = coordinator.ledger.head().record
    assert isinstance(record, RoundRecord)
    assert (record.units, record.server_step) == (4, PRIVACY.server_learning_rate)
    assert (record.server_learning_rate, record.server_step_units) == (
        PRIVACY.server_learning_rate, None)
    assert b"server_step_units" not in coordinator.ledger.head().body


class Crash(BaseException):
    """The aggregator dies here: nothing after it runs (not an error the round handles)."""


@pytest.mark.parametrize("saved_before", [None, "steps", "rule"])
def test_a_round_published_before_a_crash_is_ledgered_with_its_step_at_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_before: str | None) -> None:
    """The aggregator died between publishing version 1 and appending its ledger entry: the
    restart writes the entry from the outcome saved in coordinator.json, units, step and the
    rule that gave it included, that rule as it was when the round merged, though the
    restart runs under another rate. A state saved before the rule was kept writes the step
    without it; one saved before steps were kept writes neither, as entries from before
    them are."""
    policy = PrivacyPolicy(**{**PRIVACY.__dict__, "server_learning_rate": 3.0,
                              "server_step_units": 2})
    data = tmp_path / "data"
    coordinator = open_coordinator(data, Clock(), privacy=policy)
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(4)]

    def crash(version: object, flight: object) -> None:
        raise Crash

    monkeypatch.setattr(coordinator, "_record_published", crash)
    for s in sites:
        s.join(2)
    with pytest.raises(Crash):
        for name in STEPS:
            for s in sites:
                getattr(s, name)()
    assert coordinator.registry.numbers() == [0, 1] and coordinator.ledger.head() is None
    coordinator.ledger.close()
    state = json.loads((data / STATE_FILE).read_bytes())
    outcome = state["in_flight"]["outcome"]
    assert (outcome["units"], outcome["server_step"]) == (8, cohort_step(3.0, 8, 2))
    assert (outcome["server_learning_rate"], outcome["server_step_units"]) == (3.0, 2)
    if saved_before is not None:
        del outcome["server_learning_rate"], outcome["server_step_units"]
        if saved_before == "steps":
            del outcome["units"], outcome["server_step"]
        (data / STATE_FILE).write_text(json.dumps(state))

    changed = PrivacyPolicy(**{**policy.__dict__, "server_learning_rate": 5.0})
    restarted = open_coordinator(data, Clock(), privacy=changed)
    try:
        entry = restarted.ledger.head()
        record = entry.record
        assert isinstance(record, RoundRecord) and (record.round_id, record.version) == (1, 1)
        if saved_before == "steps":
            assert (record.units, record.server_step) == (None, None)
            assert b"units" not in entry.body and b"server_step" not in entry.body
        else:
            assert (record.units, record.server_step) == (8, cohort_step(3.0, 8, 2))
        rule = (record.server_learning_rate, record.server_step_units)
        assert rule == ((3.0, 2) if saved_before is None else (None, None))
        assert restarted.ledger.verify() == entry.hash
        assert json.loads((data / STATE_FILE).read_bytes())["in_flight"] is None
    finally:
        restarted.ledger.close()


def test_the_saved_outcome_reads_states_from_before_the_step_was_kept() -> None:
    old = {"cohort_size": 4, "dropouts": 0, "payload_sha256s": [], "epsilon_round": 0.5,
           "epsilon_total": 0.5}
    outcome = Outcome.from_json(old)
    assert (outcome.units, outcome.server_step) == (None, None)
    assert outcome.to_json() == old  # the same shape back
    stepped = Outcome(4, 0, 0.5, 0.5, (), units=8, server_step=1.5)
    assert Outcome.from_json(stepped.to_json()) == stepped
    ruled = Outcome(4, 0, 0.5, 0.5, (), units=8, server_step=1.5, server_learning_rate=3.0,
                    server_step_units=16)
    assert Outcome.from_json(ruled.to_json()) == ruled


def test_the_server_step_units_must_be_a_whole_number_of_units() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match=r"privacy\.server_step_units"):
            PrivacyPolicy(server_step_units=bad)
    assert PrivacyPolicy(server_step_units=100).server_step_units == 100


@pytest.mark.parametrize("step", ["advertise", "share", "submit"])
def test_a_site_missing_a_phase_hears_the_phase_and_missed_deadline(fleet, step) -> None:
    coordinator, clock, sites = fleet
    quiet = sites[3]
    run(coordinator, clock, sites, skip=(quiet, step))
    stopped = quiet.outcome()
    assert isinstance(stopped, Stopped)
    assert (stopped.phase, stopped.drop_reason, stopped.site_only, stopped.retry) == (
        MISSED[step], DropReason.MISSED_DEADLINE, True, True)
    # The rest finish without it: its vector is not in the sum.
    for s in sites[:3]:
        assert s.outcome() == Finished(1, 3, (quiet.id,))


def test_a_site_missing_unmasking_is_in_the_sum(fleet) -> None:
    coordinator, clock, sites = fleet
    quiet = sites[3]
    run(coordinator, clock, sites, skip=(quiet, "unmask"))
    assert {s.outcome() for s in sites} == {Finished(1, 4, ())}


def test_too_few_sites_abort_the_whole_round_below_min_cohort(tmp_path: Path) -> None:
    clock = Clock()
    coordinator = open_coordinator(tmp_path / "data", clock, size=3)
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(3)]
    run(coordinator, clock, sites, skip=(sites[2], "share"))
    for s in sites[:2]:
        stopped = s.outcome()
        assert (stopped.phase, stopped.drop_reason, stopped.site_only) == (
            RoundPhase.SHARE_KEYS, DropReason.BELOW_MIN_COHORT, False)
    # The ledger says so too: aborted in share_keys, no sum, nothing spent.
    entry = coordinator.ledger.head().record
    assert isinstance(entry, StoppedRound)
    assert (entry.round_id, entry.outcome, entry.phase, entry.drop_reason, entry.check,
            entry.contributors, entry.epsilon_round, entry.payload_sha256s) == (
        1, "aborted", "share_keys", "below_min_cohort", None, 0, 0.0, ())
    coordinator.ledger.close()


def test_an_abort_cut_short_before_its_ledger_append_is_ledgered_once_at_restart(
        tmp_path: Path, monkeypatch) -> None:
    """The aggregator dies after saving an aborted round's entry, before the ledger append:
    the restart appends that entry and does not also abandon the round it ended."""
    clock = Clock()
    data = tmp_path / "data"
    coordinator = open_coordinator(data, clock, size=3)
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(3)]

    def killed(entry: object, notify: bool = True) -> None:
        raise SystemExit("killed between coordinator.json and the ledger")

    monkeypatch.setattr(coordinator.ledger, "append", killed)
    with pytest.raises(SystemExit):
        run(coordinator, clock, sites, skip=(sites[2], "share"))
    coordinator.ledger.close()

    restarted = open_coordinator(data, clock, size=3)
    (entry,) = [e.record for e in restarted.ledger.entries()]
    assert (entry.round_id, entry.outcome, entry.drop_reason) == (1, "aborted",
                                                                  "below_min_cohort")
    assert json.loads((data / STATE_FILE).read_bytes())["in_flight"] is None
    restarted.ledger.close()


def test_a_change_wakes_only_the_sites_it_concerns(fleet) -> None:
    """No thundering herd: a join wakes the joining site's follower alone, a message wakes
    nobody, and a cohort starting or a phase closing wakes each member once."""
    coordinator, _, sites = fleet  # a cohort of 4
    wakes = {s.id: CountedWaiters() for s in sites}
    coordinator._site_waits.update(wakes)  # as if each site's JoinRound were following
    for s in sites[:3]:
        s.join()
    assert [wakes[s.id].count for s in sites] == [1, 1, 1, 0]
    sites[3].join()  # its join, then the cohort starts
    assert [wakes[s.id].count for s in sites] == [2, 2, 2, 2]
    for s in sites[:3]:
        s.advertise()
    assert [wakes[s.id].count for s in sites] == [2, 2, 2, 2]
    sites[3].advertise()  # the last one closes the phase
    assert [wakes[s.id].count for s in sites] == [3, 3, 3, 3]


class CountedWaiters(Waiters):
    """Waiters counting how often they were notified."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def notify(self) -> None:
        self.count += 1
        super().notify()


def test_watchers_and_ledger_followers_wake_only_at_a_publication(fleet) -> None:
    coordinator, _, sites = fleet
    coordinator.registry.published = versions = CountedWaiters()
    coordinator.ledger.appended = ledger = CountedWaiters()
    for s in sites:
        s.join()
    for step in STEPS[:-1]:
        for s in sites:
            getattr(s, step)()
    assert (versions.count, ledger.count) == (0, 0)  # joins, messages, phases: not theirs
    for s in sites:
        s.unmask()
    assert coordinator._announcer is not None
    coordinator._announcer.join(10.0)  # the watchers are woken once the round is done
    assert (versions.count, ledger.count) == (1, 1)  # version 1 and its ledger entry
    assert coordinator.wait_for_version(0, 0) and not coordinator.wait_for_version(1, 0)
    assert coordinator.wait_for_ledger(0, 0) and not coordinator.wait_for_ledger(1, 0)


def test_a_waiting_stream_wakes_at_news_or_when_its_caller_leaves(fleet) -> None:
    """A Watch or ledger follower sleeps on its own event: a publication wakes it, and so
    does its caller hanging up (the service sets the event), long before the timeout."""
    import time

    coordinator, _, sites = fleet
    left = threading.Event()
    threading.Timer(0.2, left.set).start()  # the caller hangs up
    started = time.monotonic()
    assert not coordinator.wait_for_version(0, 60.0, left)
    assert not coordinator.wait_for_ledger(0, 60.0, left)  # already set: no wait at all
    assert time.monotonic() - started < 30.0

    published = threading.Event()
    waiter = threading.Thread(
        target=lambda: published.set() if coordinator.wait_for_version(0, 60.0) else None)
    waiter.start()
    for s in sites:
        s.join()
    for step in STEPS:
        for s in sites:
            getattr(s, step)()
    waiter.join(30.0)
    assert published.is_set()  # woken by version 1, not by the 60-s timeout


def test_a_rejected_aggregate_ends_the_round_in_merge(fleet) -> None:
    coordinator, _, sites = fleet
    forged_round(sites)
    stopped = {s.outcome() for s in sites}
    assert len(stopped) == 1
    (outcome,) = stopped
    assert (outcome.phase, outcome.drop_reason, outcome.site_only) == (
        RoundPhase.MERGE, DropReason.UPDATE_REJECTED, False)
    assert coordinator.rejected()[0]["round_id"] == 1


def test_a_rejected_round_leaves_a_signed_ledger_entry_and_the_next_round_follows(fleet
                                                                                  ) -> None:
    coordinator, clock, sites = fleet
    forged_round(sites)
    entry = coordinator.ledger.head()
    stopped = entry.record
    assert isinstance(stopped, StoppedRound)
    assert (stopped.round_id, stopped.outcome, stopped.phase, stopped.check) == (
        1, "rejected", "merge", "weight_sum")
    low, high = stopped.allowed
    assert not low <= stopped.measured <= high  # the forged weight word, as measured
    assert (stopped.contributors, stopped.version, len(stopped.payload_sha256s)) == (4, 0, 4)
    # The aggregator saw the sum: the charge is spent, and the ledger says so.
    assert stopped.epsilon_round > 0
    assert stopped.epsilon_total == coordinator.budget_status().epsilon_spent
    assert b'"kind":"round_stopped"' in entry.body
    # The same sites, honest now, publish round 2 after it; the chain holds both.
    for s in sites:
        s.round_id, s.cursor = None, 0
    run(coordinator, clock, sites)
    first, second = coordinator.ledger.entries()
    assert first == entry and isinstance(second.record, RoundRecord)
    assert (second.record.round_id, second.record.version) == (2, 1)
    assert second.record.epsilon_total >= stopped.epsilon_total
    assert b"kind" not in second.body  # published entries keep their old form
    assert coordinator.ledger.verify() == second.hash


def test_a_round_in_flight_at_restart_is_abandoned_with_its_phase(tmp_path: Path) -> None:
    clock = Clock()
    data = tmp_path / "data"
    coordinator = open_coordinator(data, clock)
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(4)]
    for s in sites:
        s.join()
    for s in sites:
        s.advertise()  # now in share_keys
    coordinator.ledger.close()

    restarted = open_coordinator(data, clock)
    _, events = restarted.follow(sites[0].id, 1, 0, 0)
    (event,) = events
    assert (event.payload.phase, event.payload.drop_reason, event.payload.site_only) == (
        RoundPhase.SHARE_KEYS, DropReason.ABANDONED_AT_RESTART, False)
    state = json.loads((data / STATE_FILE).read_bytes())
    assert state["in_flight"] is None and state["next_round"] == 2
    assert state["abandoned"] == [{"round_id": 1, "phase": "share_keys",
                                   "reason": event.payload.reason}]
    entry = restarted.ledger.head().record
    assert (entry.round_id, entry.outcome, entry.phase, entry.drop_reason) == (
        1, "abandoned", "share_keys", "abandoned_at_restart")
    restarted.ledger.close()


def test_a_stopped_round_saved_but_not_yet_ledgered_is_ledgered_at_restart(fleet, tmp_path
                                                                           ) -> None:
    """The aggregator died between saving a stopped round's entry in coordinator.json and
    appending it to the ledger: the restart appends it, once."""
    coordinator, clock, sites = fleet
    forged_round(sites)
    (entry,) = list(coordinator.ledger.entries())
    coordinator.ledger.close()
    data = tmp_path / "data"
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        (data / name).unlink(missing_ok=True)  # the ledger as it was before the append

    restarted = open_coordinator(data, clock)
    assert list(restarted.ledger.entries()) == [entry]  # the same bytes, signed again the same
    restarted.ledger.close()
    again = open_coordinator(data, clock)
    assert list(again.ledger.entries()) == [entry]  # not appended twice
    again.ledger.close()


OLD_FILE = {  # coordinator.json as aggregators before the typed state wrote it
    "next_round": 4,
    "spent": [{"round_id": 1, "charge": {"noise_multiplier": 1.0, "sampling_rate": 1.0,
                                         "uses": 1}}],
    "in_flight": None,
    "abandoned": [{"round_id": 2, "reason": "the aggregator restarted during share_keys; "
                                            "nothing was released"}],
    "rejected": [{"round_id": 3, "reason": "forged", "contributors": [1, 2, 3],
                  "payload_sha256s": ["ab"], "rejected_at_ms": 5}],
    "suspects": [1, 2, 3],
    "quarantined": {"7": "in every rejected cohort"},
}


def test_the_typed_state_reads_an_older_file_and_round_trips() -> None:
    state = CoordinatorState.from_json(OLD_FILE)
    assert state.next_round == 4 and state.spent[0].charge.noise_multiplier == 1.0
    assert state.abandoned[0].phase is None and state.quarantined == {7: "in every rejected "
                                                                         "cohort"}
    assert state.participation_cap is None and state.stopped == []
    written = state.to_json()
    newer = ("participation_cap", "stopped")
    assert {k: v for k, v in written.items() if k not in newer} == OLD_FILE
    assert CoordinatorState.from_json(written) == state


def test_an_older_abandoned_round_replays_without_a_phase(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / STATE_FILE).write_text(json.dumps(OLD_FILE))
    coordinator = open_coordinator(data, Clock())
    assert coordinator.quarantined() == {7: "in every rejected cohort"}
    _, (event,) = coordinator.follow(1, 2, 0, 0)
    assert (event.payload.phase, event.payload.drop_reason) == (
        None, DropReason.ABANDONED_AT_RESTART)
    assert coordinator.budget_status().rounds == 1
    coordinator.ledger.close()


# ---- the participation cap -------------------------------------------------------------

CAPPED = PrivacyPolicy(clip_norm=1.0, noise_multiplier=4.0, epsilon_budget=10.0,
                       fixed_point_clip=1.0, participation_cap=3)


@pytest.mark.parametrize("cap", [0, -1, True, 2.5])
def test_a_participation_cap_must_be_a_whole_number_of_rounds(cap) -> None:
    with pytest.raises(ConfigError, match="participation_cap"):
        PrivacyPolicy(participation_cap=cap)


def test_the_cap_reaches_the_round_config_the_budget_and_the_state(tmp_path: Path) -> None:
    clock = Clock()
    data = tmp_path / "data"
    coordinator = open_coordinator(data, clock, privacy=CAPPED)
    sites = [Site(coordinator, f"site-{i}", seed=i) for i in range(4)]
    run(coordinator, clock, sites)
    assert sites[0].setup.participation_cap == 3
    status = coordinator.budget_status()
    assert status.participation_cap == 3 and status.rounds == 1
    assert coordinator.budget.cap is not None and coordinator.budget.cap.max_rounds == 3
    assert json.loads((data / STATE_FILE).read_bytes())["participation_cap"] == 3
    assert coordinator.ledger.head().record.participation_cap == 3  # epsilon's meaning
    coordinator.ledger.close()

    # Lowering or dropping the cap is refused; raising it is allowed and saved.
    for lower in (PrivacyPolicy(**{**CAPPED.__dict__, "participation_cap": 2}),
                  PrivacyPolicy(**{**CAPPED.__dict__, "participation_cap": None})):
        with pytest.raises(ConfigError, match="below the cap 3"):
            open_coordinator(data, clock, privacy=lower)
    raised = open_coordinator(data, clock,
                              privacy=PrivacyPolicy(**{**CAPPED.__dict__,
                                                       "participation_cap": 5}))
    assert raised.budget_status().participation_cap == 5
    raised.ledger.close()
    assert json.loads((data / STATE_FILE).read_bytes())["participation_cap"] == 5


def test_a_cap_cannot_be_added_once_rounds_were_spent_without_one(fleet, tmp_path) -> None:
    coordinator, clock, sites = fleet
    run(coordinator, clock, sites)
    assert coordinator.budget_status().participation_cap is None
    coordinator.ledger.close()
    with pytest.raises(ConfigError, match="added after 1 rounds"):
        open_coordinator(coordinator.data_dir, clock, privacy=CAPPED)


def test_a_capped_budget_refuses_a_round_a_unit_could_not_enter_k_times(tmp_path) -> None:
    tight = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=2.0,
                          fixed_point_clip=1.0, participation_cap=50)
    coordinator = open_coordinator(tmp_path / "data", Clock(), privacy=tight)
    site = Site(coordinator, "site-0", seed=0)
    with pytest.raises(RefusedError, match="cap 50 rounds per unit") as refused:
        coordinator.join(site.id, None, 0, 1)
    assert refused.value.kind == "budget_exhausted"
    coordinator.ledger.close()
