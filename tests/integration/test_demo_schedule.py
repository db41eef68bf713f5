"""The demo's knowledge arriving over rounds: which round each session comes in
(`sim.demo.schedule`), round 1's facts' retention (`sim.evaluation.retention`) and what the
demo prints (`summary_line`, `round_table`), without running a fleet."""

from __future__ import annotations

import json

import pytest

from fleetmind.sim import world as W
from fleetmind.sim.demo import DemoConfig, arrivals, schedule, summary_line
from fleetmind.sim.demo_report import round_table
from fleetmind.sim.evaluation import retention


def demo_world(facts_per_site: int, rounds: int) -> W.World:
    cfg = DemoConfig(sites=3, rounds=rounds, facts_per_site=facts_per_site, users_per_fact=4,
                     canaries_per_site=3, repeated_canaries_per_site=1, canary_repeats=4)
    return W.make_world(cfg.world_spec())


def stated(session: dict) -> str:
    return session["messages"][0]["content"]


@pytest.mark.parametrize("facts_per_site, rounds", [(2, 2), (5, 3), (4, 2), (3, 1)])
def test_every_facts_sessions_arrive_in_one_round_i_mod_rounds_plus_one(facts_per_site,
                                                                       rounds) -> None:
    world = demo_world(facts_per_site, rounds)
    slices = schedule(world, rounds)
    assert len(slices) == len(world.sites)
    for site, by_round in zip(world.sites, slices, strict=True):
        assert len(by_round) == rounds
        # Every session comes exactly once, in the world's order within its round.
        dealt = [s["id"] for sessions in by_round for s in sessions]
        assert sorted(dealt) == sorted(s["id"] for s in site.sessions)
        order = [s["id"] for s in site.sessions]
        for sessions in by_round:
            positions = [order.index(s["id"]) for s in sessions]
            assert positions == sorted(positions)
        for number, fact in enumerate(site.facts):
            # Read from the transcripts, not from the world's own record of them.
            rounds_said = {r for r, sessions in enumerate(by_round, start=1)
                           for s in sessions if W.statement(fact) in stated(s)}
            assert rounds_said == {number % rounds + 1}
            told = sum(W.statement(fact) in stated(s) for s in by_round[number % rounds])
            assert told == 4  # all of its users, in that one round
        # The other sessions (canaries, the repeated canary's) are dealt round-robin.
        others = [s["id"] for s in site.sessions
                  if not any(W.statement(f) in stated(s) for f in site.facts)]
        for r, sessions in enumerate(by_round, start=1):
            assert [s["id"] for s in sessions if s["id"] in others] == others[r - 1::rounds]
    assert arrivals(world, rounds) == {fact.key: number % rounds + 1 for site in world.sites
                                       for number, fact in enumerate(site.facts)}


def test_a_session_never_states_facts_of_two_rounds() -> None:
    world = demo_world(4, 2)
    for site in world.sites:
        assert any(len(facts) == 2 for facts in site.teaches.values())  # still pairs facts
        for session in site.sessions:
            numbers = [n for n, f in enumerate(site.facts) if W.statement(f) in stated(session)]
            assert tuple(numbers) == site.teaches.get(session["id"], ())
            assert len({n % 2 for n in numbers}) <= 1
    # A world whose sessions mix the rounds' facts is refused, not dealt wrongly.
    with pytest.raises(ValueError, match="fact_rounds=2"):
        schedule(demo_world(4, 1), 2)


def test_fewer_facts_than_rounds_is_refused_naming_both_flags() -> None:
    with pytest.raises(ValueError, match=r"--rounds 3 needs --facts-per-site 3 or more "
                                         r"\(it is 2\)"):
        DemoConfig(rounds=3, facts_per_site=2)
    assert DemoConfig(rounds=3, facts_per_site=3).world_spec().fact_rounds == 3
    with pytest.raises(ValueError, match="3 rounds need at least 3 facts per site"):
        schedule(demo_world(2, 2), 3)
    with pytest.raises(ValueError, match="fact_rounds=3"):
        W.WorldSpec(facts_per_site=2, fact_rounds=3)


def test_a_world_without_fact_rounds_keeps_its_digest_and_spec_json(tmp_path) -> None:
    spec = W.WorldSpec()
    assert spec.digest() == "be66065ef70dbf36"  # as before fact_rounds existed
    out = W.write_world(W.make_world(spec), tmp_path / "w")
    assert "fact_rounds" not in json.loads((out / "spec.json").read_text())
    two = W.WorldSpec(fact_rounds=2)
    assert two.digest() != spec.digest()
    again = W.read_world(W.write_world(W.make_world(two), tmp_path / "two"))
    assert again.spec == two


def test_retention_is_round_1s_recovery_now_over_its_best_so_far() -> None:
    assert retention([]) is None
    assert retention([0.75]) is None  # round 1: nothing kept yet
    assert retention([0.5, 1.0]) == 1.0
    assert retention([1.0, 0.75]) == 0.75
    assert retention([0.5, 1.0, 0.25]) == 0.25
    assert retention([0.0, 0.0]) is None  # never recovered: nothing to keep
    assert retention([None, 0.5]) is None


def row(number: int, facts_new: int, known: float | None, kept: float | None) -> dict:
    site = {"site": "site-00", "own_accuracy": 1.0, "transfer_accuracy": 0.5,
            "incontext_upper_bound": 1.0, "recovery": 0.5, "recovery_known": known,
            "recovery_new": known, "forgetting_points": 1.0, "canary_exposure_bits": 0.1}
    return {**site, "round": number, "version": number, "epsilon": 6.0, "seconds": 1.0,
            "facts_known": facts_new * number, "facts_new": facts_new if number else 0,
            "retention_round1": kept, "sites": [site]}


def test_the_last_line_names_the_facts_each_round_and_round_1s_retention() -> None:
    results = {"rounds": [row(0, 4, None, None), row(1, 4, 0.5, None), row(2, 4, 0.75, 0.5)],
               "seconds": 12.0}
    line = summary_line(results)
    assert line.startswith("after 2 rounds: facts arrived 4 in round 1, 4 in round 2;")
    assert "on all 8" in line and "round 1's facts keep 0.50 of their best recovery" in line
    one = summary_line({"rounds": results["rounds"][:2], "seconds": 5.0})
    assert "facts arrived 4 in round 1;" in one and "nothing to keep yet" in one


def test_the_round_table_shows_the_facts_so_far_and_the_retention() -> None:
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(round_table(row(2, 4, 0.75, 0.5)))
    console.print(round_table(row(0, 4, None, None)))
    text = console.export_text()
    assert "recovery: facts so far" in text and "recovery: new facts" in text
    assert "facts said so far 8, 4 of them new this round; round 1's facts keep 0.50" in text
    assert "facts said so far 0, 0 of them new this round; round 1's facts keep —" in text
