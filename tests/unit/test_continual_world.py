import hashlib
import json
import re
from collections import defaultdict
from dataclasses import asdict

import pytest
from support.world import session_text

from fleetmind.sim import continual_world as CW
from fleetmind.sim import world as W

SPEC = CW.ContinualSpec(seed=5, sites=3, rounds=4, facts_per_site_per_round=3,
                       users_per_fact=3, canaries_per_site_per_round=1,
                       repeated_canaries_per_site_per_round=1, canary_repeats=4)


@pytest.fixture(scope="module")
def world() -> CW.ContinualWorld:
    return CW.make_continual_world(SPEC)


def every_session(world: CW.ContinualWorld) -> list[tuple[int, str, dict]]:
    return [(r, site, s) for r in range(world.spec.rounds) for site in world.site_names
            for s in world.sessions_for_round(site, r)]


def test_same_seed_same_world_other_seed_other_world(world) -> None:
    again = CW.make_continual_world(SPEC)
    assert again.records == world.records and again.facts == world.facts
    assert again.canaries == world.canaries and again.general == world.general
    other = CW.make_continual_world(CW.ContinualSpec(**{**asdict(SPEC), "seed": 6}))
    assert [f.fact for f in other.facts] != [f.fact for f in world.facts]


def test_each_round_brings_the_configured_facts_per_site_stated_by_distinct_users(world) -> None:
    for r in range(SPEC.rounds):
        for site in world.site_names:
            arrived = world.facts_first_said(r, site)
            assert len(arrived) == SPEC.facts_per_site_per_round
            sessions = world.sessions_for_round(site, r)
            for fact in arrived:
                sayers = {s["user"] for s in sessions
                          if W.statement(fact.fact) in s["messages"][0]["content"]}
                assert sayers == set(fact.users) and len(fact.users) == SPEC.users_per_fact
    assert len({f.key for f in world.facts}) == SPEC.sites * SPEC.rounds * 3
    assert [len(world.facts_known_before(r)) for r in range(SPEC.rounds + 1)] == \
        [0, 9, 18, 27, 36]


def test_a_fact_appears_in_no_session_before_its_round_nor_at_another_site(world) -> None:
    for r, site, session in every_session(world):
        said = session_text(session)
        for fact in world.facts:
            mentioned = f"the {fact.fact.attribute} of {fact.fact.name} " in said
            if mentioned:
                assert fact.round <= r and fact.site == site, (fact, session["id"])


def test_returning_users_restate_or_ask_their_own_old_facts(world) -> None:
    said_before: dict[str, set[W.Fact]] = defaultdict(set)
    kinds = set()
    for r in range(SPEC.rounds):
        for site in world.site_names:
            for record in world.records_for_round(site, r):
                if record.kind in ("restate", "ask"):
                    kinds.add(record.kind)
                    assert r >= 1 and set(record.asked) <= said_before[record.user]
                    assert set(record.stated) <= said_before[record.user]
        for site in world.site_names:
            for record in world.records_for_round(site, r):
                if record.kind == "new":
                    said_before[record.user] |= set(record.stated)
    assert kinds == {"restate", "ask"}
    recalls = [rec for key, recs in world.records.items() for rec in recs
               if rec.kind in ("restate", "ask")]
    assert len(recalls) == SPEC.sites * (SPEC.rounds - 1) * SPEC.recalls_per_site_per_round


def test_returning_users_bring_new_facts_too_and_never_repeat_a_transcript() -> None:
    world = CW.make_continual_world(CW.ContinualSpec(seed=1, sites=2, rounds=3,
                                                   returning_share=1.0))
    for site in world.site_names:
        first = {rec.user for rec in world.records_for_round(site, 0)}
        later = [rec for rec in world.records_for_round(site, 2) if rec.kind == "new"]
        assert any(rec.user in first for rec in later)
    transcripts = [(s["user"], json.dumps(s["messages"])) for _, _, s in every_session(world)]
    assert len(transcripts) == len(set(transcripts))
    for records in world.records.values():  # one session a round, repeated canaries aside
        users = [rec.user for rec in records if rec.kind != "repeated_canary"]
        assert len(users) == len(set(users))


def test_sessions_use_only_the_strict_form_and_never_the_other_forms(world) -> None:
    statement = r"the \w+ of \w+ is \w+ \."
    user_turn = re.compile(rf"^({statement})( {statement})*$|^what is the \w+ of \w+ \?$")
    facts = [f.fact for f in world.facts] + [f for c in world.canaries for f in c.facts]
    others = [W.ask(f, form) for f in facts for form in W.QUESTION_FORMS
              if not W.QUESTION_FORMS[form].in_sessions]
    corpus = "\n".join(session_text(s) for _, _, s in every_session(world))
    assert not [q for q in others if q in corpus]
    for _, _, session in every_session(world):
        for message in session["messages"]:
            if message["role"] == "user":
                assert user_turn.match(message["content"]), message["content"]
    assert set(W.OTHER_FORMS) and set(W.OTHER_FORMS) < set(W.PROBE_FORMS)


def test_a_session_states_facts_of_distinct_attributes(world) -> None:
    # The toy model reads a question about one of two same-attribute facts at chance.
    for records in world.records.values():
        for record in records:
            assert len({f.attribute for f in record.stated}) == len(record.stated)


def test_probes_in_every_form_share_the_answer(world) -> None:
    facts = world.facts_known_before(2)
    for form in W.QUESTION_FORMS:
        probes = world.probes(facts, form)
        assert [p.fact for p in probes] == [f.fact for f in facts]
        for probe, fact in zip(probes, facts, strict=True):
            assert probe.round == fact.round < 2 and probe.answer == W.answer(fact.fact)
            assert probe.messages == [{"role": "user", "content": probe.question}]
            assert probe.context_messages[0]["content"] == W.statement(fact.fact)
            assert probe.context_messages[-1]["content"] == probe.question
            assert W.parse_answer(probe.answer, fact.fact)
    fact = facts[0].fact
    assert W.ask(fact, "attribute_first") == f"what {fact.attribute} is {fact.name} ?"
    assert W.ask(fact) == W.question(fact)
    with pytest.raises(ValueError, match="unknown question form 'tell_me'"):
        world.probes(facts, "tell_me")


def test_canaries_arrive_every_round_and_are_said_as_often_as_configured(world) -> None:
    fact_names = {f.fact.name for f in world.facts}
    task_names = {f["name"] for task in world.general + world.guard for f in task["facts"]}
    sessions = {s["id"]: (r, site, s) for r, site, s in every_session(world)}
    for r in range(SPEC.rounds):
        for site in world.site_names:
            arriving = world.canaries_arriving(r, site)
            assert sorted(c.repeats for c in arriving) == [1, SPEC.canary_repeats]
    for canary in world.canaries:
        name = canary.facts[0].name
        assert name not in fact_names | task_names
        holders = [(r, s) for r, site, s in sessions.values() if f" of {name} " in session_text(s)]
        assert sorted(s["id"] for _, s in holders) == sorted(canary.sessions)
        assert {s["user"] for _, s in holders} == {canary.user}
        assert min(r for r, _ in holders) == canary.round
        assert len({json.dumps(s["messages"]) for _, s in holders}) == canary.repeats
        # a canary's user says nothing else
        assert all(s["user"] != canary.user for _, _, s in sessions.values()
                   if s["id"] not in canary.sessions)
        row = canary.row(world.secret_values)
        assert row["round"] == canary.round and row["repeats"] == canary.repeats
        assert row["secret"] == " ".join(f.value for f in canary.facts)
    assert len(world.canaries_arrived_before(2)) == 2 * SPEC.sites * 2


def test_control_canaries_are_said_nowhere_and_change_nothing_else(world) -> None:
    """Controls are private records on names no session, fact, canary or task uses, fixed by
    the seed; the rest of the world is the same with none of them."""
    assert len(world.controls) == SPEC.control_canaries == 32
    said = {f.fact.name for f in world.facts} | {c.facts[0].name for c in world.canaries}
    task_names = {f["name"] for task in world.general + world.guard for f in task["facts"]}
    names = [control[0].name for control in world.controls]
    assert len(set(names)) == len(names) and not set(names) & (said | task_names)
    for control in world.controls:
        assert len(control) == W.CANARY_FACTS and {f.name for f in control} == {control[0].name}
        assert len({f.attribute for f in control}) == W.CANARY_FACTS
    text = " ".join(session_text(s) for _, _, s in every_session(world))
    assert not any(f" of {name} " in text for name in names)
    assert CW.make_continual_world(SPEC).controls == world.controls
    none = CW.make_continual_world(CW.ContinualSpec(**{**asdict(SPEC), "control_canaries": 0}))
    assert none.controls == () and none.records == world.records
    assert [[(f.attribute, f.value) for f in t] for t in none.twins] == [
        [(f.attribute, f.value) for f in t] for t in world.twins]
    assert none.facts == world.facts and none.canaries == world.canaries
    with pytest.raises(ValueError, match=r"control_canaries=500: .* only \d+ are left"):
        CW.make_continual_world(CW.ContinualSpec(**{**asdict(SPEC), "control_canaries": 500}))


def test_each_canary_has_a_twin_its_secret_on_a_name_nobody_said(world) -> None:
    assert len(world.twins) == len(world.canaries)
    said = {f.fact.name for f in world.facts} | {c.facts[0].name for c in world.canaries}
    controls = {c[0].name for c in world.controls}
    names = [twin[0].name for twin in world.twins]
    assert len(set(names)) == len(names) and not set(names) & (said | controls)
    text = " ".join(session_text(s) for _, _, s in every_session(world))
    assert not any(f" of {name} " in text for name in names)
    for canary, twin in zip(world.canaries, world.twins, strict=True):
        assert [(f.attribute, f.value) for f in twin] == [
            (f.attribute, f.value) for f in canary.facts]
        assert {f.name for f in twin} == {twin[0].name} != {canary.facts[0].name}


def test_no_private_record_holds_a_value_any_fact_says(world) -> None:
    said = {(f.fact.attribute, f.fact.value) for f in world.facts}
    for attribute, every in W.lexicon().values.items():
        assert world.secret_values[attribute] == tuple(
            v for v in every if (attribute, v) not in said)
    records = [c.facts for c in world.canaries] + list(world.controls) + list(world.twins)
    assert all(f.value in world.secret_values[f.attribute] for r in records for f in r)
    # and every session that says a canary says its new values
    secret = {(f.name, f.attribute): f.value for c in world.canaries for f in c.facts}
    canary_sessions = [rec for recs in world.records.values() for rec in recs
                       if rec.kind in ("canary", "repeated_canary")]
    assert canary_sessions and all(secret[(f.name, f.attribute)] == f.value
                                   for rec in canary_sessions for f in rec.stated + rec.asked)


def test_secrets_apart_changes_the_canaries_values_and_nothing_else(world) -> None:
    shared = CW.make_continual_world(CW.ContinualSpec(**{**asdict(SPEC), "secrets_apart": False}))
    assert shared.secret_values == W.lexicon().values
    assert shared.facts == world.facts and shared.general == world.general
    assert [(c.site, c.round, c.user, c.sessions) for c in shared.canaries] == [
        (c.site, c.round, c.user, c.sessions) for c in world.canaries]
    moved = 0
    for key, recs in world.records.items():
        for rec, before in zip(recs, shared.records[key], strict=True):
            if rec.kind in ("canary", "repeated_canary"):
                assert [(f.name, f.attribute) for f in rec.stated + rec.asked] == [
                    (f.name, f.attribute) for f in before.stated + before.asked]
                moved += rec.stated != before.stated
            else:
                assert rec == before
    assert moved  # the world's canaries did move to values no fact says


def test_a_canary_is_ranked_among_the_values_no_fact_says(world, tmp_path) -> None:
    canary = world.canaries[0]
    row = world.canary_row(canary.facts)
    for slot, fact in zip(row["slots"], canary.facts, strict=True):
        assert slot["answer"] in slot["alternatives"]
        assert slot["alternatives"] == [W.answer(W.Fact(fact.name, fact.attribute, v))
                                        for v in world.secret_values[fact.attribute]]
    written = CW.write_continual_world(world, tmp_path / "cw")
    first = json.loads((written / "canaries.jsonl").read_text().splitlines()[0])
    assert first["slots"] == row["slots"]
    control = json.loads((written / "control_canaries.jsonl").read_text().splitlines()[0])
    attribute = world.controls[0][0].attribute
    assert len(control["slots"][0]["alternatives"]) == len(world.secret_values[attribute]) < 40


def test_a_world_whose_facts_say_every_value_cannot_keep_secrets_apart() -> None:
    crowded = {"seed": 0, "sites": 8, "rounds": 16, "facts_per_site_per_round": 8,
               "canaries_per_site_per_round": 0, "repeated_canaries_per_site_per_round": 0,
               "control_canaries": 0}
    with pytest.raises(ValueError, match=r"secrets_apart: .* fewer than 2 values"):
        CW.make_continual_world(CW.ContinualSpec(**crowded))
    assert CW.make_continual_world(CW.ContinualSpec(**crowded, secrets_apart=False)).facts


def test_repeated_canaries_can_be_spread_over_rounds() -> None:
    spec = CW.ContinualSpec(seed=2, sites=2, rounds=3, canary_repeats=6, canary_repeat_rounds=2)
    world = CW.make_continual_world(spec)
    for canary in world.canaries:
        if canary.repeats == 1:
            continue
        last = min(canary.round + 1, spec.rounds - 1)
        assert set(canary.rounds_said) == {canary.round, last}
        assert canary.repeats == 6
        for session, r in zip(canary.sessions, canary.rounds_said, strict=True):
            ids = [s["id"] for s in world.sessions_for_round(canary.site, r)]
            assert session in ids


def test_a_snapshot_is_a_plain_world_of_the_rounds_so_far(world) -> None:
    snap = world.snapshot(1)
    assert [s.name for s in snap.sites] == list(world.site_names)
    assert len(snap.facts()) == len(world.facts_known_before(2))
    for site in snap.sites:
        assert site.sessions == world.sessions_through(site.name, 1)
        assert len(site.canaries) == 2 and len(site.repeated_canaries) == 2
    assert snap.general == world.general


def test_write_and_read_round_trip(world, tmp_path) -> None:
    out = CW.write_continual_world(world, tmp_path / "cw")
    assert json.loads((out / "spec.json").read_text())["digest"] == SPEC.digest()
    lines = (out / "rounds" / "r02" / "sites" / "site-01" / "sessions.jsonl").read_text()
    assert [json.loads(x) for x in lines.splitlines()] == world.sessions_for_round("site-01", 2)
    probes = [json.loads(x) for x in (out / "probes.jsonl").read_text().splitlines()]
    assert len(probes) == len(world.facts) * len(W.QUESTION_FORMS)
    assert {p["form"] for p in probes} == set(W.QUESTION_FORMS)
    controls = (out / "control_canaries.jsonl").read_text().splitlines()
    assert [json.loads(x)["secret"] for x in controls] == [
        " ".join(f.value for f in c) for c in world.controls]
    facts = [json.loads(x) for x in (out / "facts.jsonl").read_text().splitlines()]
    assert [f["round"] for f in facts] == [f.round for f in world.facts]
    again = CW.read_continual_world(out)
    assert again.records == world.records and again.spec == world.spec
    with pytest.raises(ValueError, match="read_continual_world"):
        W.read_world(out)


@pytest.mark.parametrize("bad", [{"sites": 0}, {"rounds": 0}, {"users_per_fact": 1},
                                 {"max_facts_per_session": 5}, {"returning_share": 1.5},
                                 {"canary_repeats": 9}, {"canary_repeat_rounds": 7},
                                 {"facts_per_site_per_round": 500},
                                 {"canaries_per_site_per_round": -1},
                                 {"control_canaries": -1}])
def test_impossible_specs_are_refused_with_the_reason(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        CW.ContinualSpec(**bad)


def test_a_round_outside_the_world_is_refused(world) -> None:
    with pytest.raises(ValueError, match="rounds 0 to 3"):
        world.sessions_for_round("site-00", 4)
    with pytest.raises(ValueError, match="unknown site"):
        world.facts_first_said(0, "site-99")


# The plain world's content, hashed with the code before the continual world was added
# (`git show e5d943d:sim/world.py`): adding it changed no existing world.
BEFORE = {
    "{}": "94f501a45a5aed491f35dd8395b032d0c86b812fdb729ea9000298658b3e56af",
    '{"facts_per_site": 5, "seed": 3, "sites": 3}':
        "192c085ead30082b5a90a79e725565d626818d244070c01369a2831415b7d5b5",
    '{"facts_per_site": 4, "repeated_canaries_per_site": 2, "seed": 1, "sites": 6, '
    '"users_per_fact": 16}': "113fa10d1adfadab4a43de2d1475a76808ac2018b3302a00635ff39c3f55183d",
}


@pytest.mark.parametrize("kwargs", sorted(BEFORE))
def test_the_plain_world_is_unchanged(kwargs: str) -> None:
    world = W.make_world(W.WorldSpec(**json.loads(kwargs)))
    blob = json.dumps({"sites": [[s.name, [asdict(f) for f in s.facts],
                                  [[asdict(f) for f in c] for c in s.canaries],
                                  [[asdict(f) for f in c] for c in s.repeated_canaries],
                                  s.sessions] for s in world.sites],
                       "general": world.general, "guard": world.guard,
                       "digest": world.spec.digest()}, sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == BEFORE[kwargs]
