import json
from collections import defaultdict
from dataclasses import asdict

import pytest
from support.world import session_text

from fleetmind.sim import world as W


@pytest.fixture(scope="module")
def world() -> W.World:
    return W.make_world(W.WorldSpec(seed=3, sites=3, facts_per_site=5))


def test_same_seed_same_world_and_other_seed_other_world(world: W.World) -> None:
    again = W.make_world(W.WorldSpec(seed=3, sites=3, facts_per_site=5))
    other = W.make_world(W.WorldSpec(seed=4, sites=3, facts_per_site=5))
    assert [s.sessions for s in again.sites] == [s.sessions for s in world.sites]
    assert again.general == world.general
    assert [s.facts for s in other.sites] != [s.facts for s in world.sites]


def test_sessions_are_openai_chat_records(world: W.World) -> None:
    for site in world.sites:
        for session in site.sessions:
            assert set(session) == {"id", "user", "messages"}
            assert session["messages"][0]["role"] == "user"
            assert {m["role"] for m in session["messages"]} <= {"user", "assistant", "system"}
            assert all(isinstance(m["content"], str) and m["content"] for m in session["messages"])


def test_every_fact_is_stated_by_three_users_in_separate_sessions(world: W.World) -> None:
    for site in world.sites:
        users = defaultdict(set)
        sessions = defaultdict(set)
        for session in site.sessions:
            for fact in site.facts:
                if W.statement(fact) in session["messages"][0]["content"]:
                    users[fact.key].add(session["user"])
                    sessions[fact.key].add(session["id"])
        for fact in site.facts:
            assert len(users[fact.key]) >= 3, fact
            assert len(sessions[fact.key]) >= 3, fact


def test_facts_are_known_only_at_their_own_site(world: W.World) -> None:
    for site in world.sites:
        text = " ".join(session_text(s) for s in site.sessions)
        for fact in world.foreign_facts(site.name):
            assert W.statement(fact) not in text
        assert len(world.foreign_facts(site.name)) == 5 * 2


def test_each_canary_is_a_private_record_said_once_in_one_session(world: W.World) -> None:
    every_session = [s for site in world.sites for s in site.sessions]
    fact_names = {fact.name for _, fact in world.facts()}
    for site in world.sites:
        assert len(site.canaries) == 2
        for canary in site.canaries:
            assert len(canary) == W.CANARY_FACTS
            assert len({f.name for f in canary}) == 1 and canary[0].name not in fact_names
            assert len({f.attribute for f in canary}) == W.CANARY_FACTS
            holders = [s for s in every_session
                       if any(W.statement(f) in session_text(s) for f in canary)]
            assert len(holders) == 1
            # the one session states every fact of the record, then asks about each
            assert all(session_text(holders[0]).count(W.statement(f)) == 2 for f in canary)


def test_canary_rows_hold_every_alternative_once(world: W.World) -> None:
    row = W.canary_row(world.sites[0].canaries[0])
    assert row["secret"] == " ".join(f.value for f in world.sites[0].canaries[0])
    for slot in row["slots"]:
        assert slot["answer"] in slot["alternatives"]
        assert len(set(slot["alternatives"])) == W.VALUES_PER_ATTRIBUTE


def test_general_tasks_use_fresh_entities_and_cover_one_to_four_facts(world: W.World) -> None:
    fact_names = {fact.name for _, fact in world.facts()}
    sizes = set()
    for task in world.general:
        stated = [W.Fact(**f) for f in task["facts"]]
        assert not {f.name for f in stated} & fact_names
        assert W.Fact(**task["asked"]) in stated
        sizes.add(len(stated))
    assert sizes == {1, 2, 3, 4}


def test_write_and_read_world_round_trip(world: W.World, tmp_path) -> None:
    out = W.write_world(world, tmp_path / "w")
    spec = json.loads((out / "spec.json").read_text())
    assert spec["digest"] == world.spec.digest()
    probes = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert len(probes) == 15
    assert all(p["answer"].split()[-2] == p["value"] for p in probes)
    assert all(p["forms"]["strict"] == p["question"] for p in probes)
    assert {form for p in probes for form in p["forms"]} == set(W.QUESTION_FORMS)
    canaries = (out / "canaries.jsonl").read_text().splitlines()
    assert len(canaries) == 6
    for site in world.sites:
        lines = (out / "sites" / site.name / "sessions.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == site.sessions
    again = W.read_world(out)
    assert asdict(again.spec) == asdict(world.spec)
    assert again.general == world.general


def test_a_repeated_canary_is_one_users_record_in_its_own_sessions(world: W.World,
                                                                    tmp_path) -> None:
    spec = W.WorldSpec(seed=3, sites=3, facts_per_site=5, repeated_canaries_per_site=1,
                       canary_repeats=4)
    repeated = W.make_world(spec)
    taken = {f.name for _, f in world.facts()} | {
        f.name for site in world.sites for c in site.canaries for f in c}
    for site, plain in zip(repeated.sites, world.sites, strict=True):
        (canary,) = site.repeated_canaries
        assert canary[0].name not in taken and len({f.name for f in canary}) == 1
        holders = [s for s in site.sessions if W.statement(canary[0]) in session_text(s)]
        assert len(holders) == 4 and len({s["user"] for s in holders}) == 1
        # Each a different transcript: a store keeps one of a user's identical sessions.
        assert len({json.dumps(s["messages"]) for s in holders}) == 4
        assert all(all(W.statement(f) in session_text(s) for f in canary) for s in holders)
        # Dealt among the others, which are the world without repeated canaries, in order.
        positions = [site.sessions.index(s) for s in holders]
        assert positions != list(range(len(site.sessions) - 4, len(site.sessions)))
        assert [s for s in site.sessions if s not in holders] == plain.sessions
        for task in repeated.general + repeated.guard:
            assert canary[0].name not in {f["name"] for f in task["facts"]}
    rows = [json.loads(line) for line in
            (W.write_world(repeated, tmp_path / "w") / "canaries.jsonl").read_text().splitlines()]
    assert sorted(row["repeats"] for row in rows) == [1] * 6 + [4] * 3


def test_read_world_names_the_missing_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="fleetmind model world"):
        W.read_world(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [{"sites": 0}, {"users_per_fact": 2},
                                 {"max_facts_per_session": 9}, {"facts_per_site": 10_000},
                                 {"canary_repeats": 1}, {"canary_repeats": 9},
                                 {"repeated_canaries_per_site": -1},
                                 {"repeated_canaries_per_site": 200}])
def test_impossible_specs_are_refused_with_the_reason(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        W.WorldSpec(**bad)


def test_lexicon_pools_are_disjoint_and_fixed() -> None:
    lex = W.lexicon()
    words = lex.words()
    assert len(words) == len(set(words))
    assert len(lex.names) == W.NAMES_IN_LEXICON
    assert all(len(v) == W.VALUES_PER_ATTRIBUTE for v in lex.values.values())
