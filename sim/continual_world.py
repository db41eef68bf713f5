"""The continual world: knowledge that arrives over rounds, on the toy world's lexicon and
grammar (sim/world.py). Deterministic from its `ContinualSpec`; `make_continual_world`
builds it whole, round by round, and `ContinualWorld` answers what was said where and when,
which facts and canaries a model should know after any round, and how to probe them
(docs/continual-world.md). `fleetmind bench continual` runs on it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fleetmind.sim.world import (
    ATTRIBUTES,
    CANARY_FACTS,
    NAMES_IN_LEXICON,
    QUESTION_FORMS,
    Fact,
    Site,
    Values,
    World,
    answer,
    ask,
    canary_row,
    chat,
    closed_book_prompt,
    context_prompt,
    context_tasks,
    deal,
    lexicon,
    private_record,
    question,
    question_form,
    random_fact,
    retellings,
    session_messages,
    task_prompt,
    write_json,
    write_lines,
)

GENERAL_NAMES = 128  # names a continual world keeps for its in-context tasks (general, guard)
SESSION_KINDS = ("new", "restate", "ask", "canary", "repeated_canary")


@dataclass(frozen=True)
class ContinualSpec:
    """A world where knowledge arrives over rounds 0 .. rounds-1. Validated here, at the edge.

    Each round, at each site:
    - `facts_per_site_per_round` new facts arrive, each stated by `users_per_fact` different
      users in that round, in sessions of 1 to `max_facts_per_session` facts (kind "new").
      From round 1 on, each such session is by a returning user (one who stated facts at
      this site in an earlier round) with probability `returning_share`, else by a new user.
    - `recalls_per_site_per_round` returning users come back to one of their own old facts:
      they restate it (kind "restate") or ask about it and are answered (kind "ask").
    - `canaries_per_site_per_round` private records arrive, each said once by a new user in
      one session, and `repeated_canaries_per_site_per_round` more, each said by one new user
      in `canary_repeats` different sessions dealt over `canary_repeat_rounds` rounds from
      its arrival (fewer where the world ends first; every repeat is still said).
    A user has at most one session a round, except a repeated canary's user, whose repeats
    may share one. Canary users never return with knowledge, so a canary's count is its own.
    `control_canaries` private records are never said, on names no session mentions: the
    exposure of secrets nobody told the fleet, which a said canary's is read against.
    With `secrets_apart`, every private record (canary, twin, control) holds only values
    that no fact of the world says, and its exposure ranks its secret among those values;
    the facts and sessions are those of the same spec without it (the worlds of version 1).
    """

    seed: int = 0
    sites: int = 8
    rounds: int = 6
    facts_per_site_per_round: int = 4
    users_per_fact: int = 3
    max_facts_per_session: int = 2
    returning_share: float = 0.25
    recalls_per_site_per_round: int = 2
    canaries_per_site_per_round: int = 1
    repeated_canaries_per_site_per_round: int = 1
    canary_repeats: int = 4  # more sessions than a fact's users_per_fact, but one user
    canary_repeat_rounds: int = 1
    control_canaries: int = 32
    # A value a fact teaches rises for every name on the toy model, so a canary sharing one
    # gained as much as its twin: +1.26 bits of exposure that was the fact's, not the
    # person's (docs/continual.md, "Round 1 over six noise draws").
    secrets_apart: bool = True
    general_tasks: int = 200
    guard_tasks: int = 400
    version: int = 2  # 2: secrets_apart

    def __post_init__(self) -> None:
        problems = []
        if self.sites < 1 or self.rounds < 1 or self.facts_per_site_per_round < 1:
            problems.append(f"sites={self.sites}, rounds={self.rounds}, facts_per_site_per_round="
                            f"{self.facts_per_site_per_round}: need at least 1 of each")
        if self.users_per_fact < 2:
            # The users-per-fact curve of issue 17 starts at 2; one user is a canary's count.
            problems.append(f"users_per_fact={self.users_per_fact}: need at least 2 (a fact one "
                            "user says once is a canary)")
        if not 1 <= self.max_facts_per_session <= 4:
            problems.append(f"max_facts_per_session={self.max_facts_per_session}: use 1 to 4")
        if not 0.0 <= self.returning_share <= 1.0:
            problems.append(f"returning_share={self.returning_share}: use 0 to 1")
        if min(self.recalls_per_site_per_round, self.canaries_per_site_per_round,
               self.repeated_canaries_per_site_per_round, self.control_canaries,
               self.guard_tasks) < 0 or self.general_tasks < 1:
            problems.append("recalls_per_site_per_round, canaries_per_site_per_round, "
                            "repeated_canaries_per_site_per_round, control_canaries and "
                            "guard_tasks must be >= 0, general_tasks >= 1")
        if not 2 <= self.canary_repeats <= len(retellings(CANARY_FACTS)):
            problems.append(f"canary_repeats={self.canary_repeats}: use 2 to "
                            f"{len(retellings(CANARY_FACTS))} (each repeat is a different "
                            "session)")
        if not 1 <= self.canary_repeat_rounds <= max(1, self.rounds):
            problems.append(f"canary_repeat_rounds={self.canary_repeat_rounds}: use 1 to "
                            f"rounds={self.rounds}")
        private = self.sites * self.rounds * (self.canaries_per_site_per_round
                                              + self.repeated_canaries_per_site_per_round)
        fact_names = NAMES_IN_LEXICON - GENERAL_NAMES - private
        facts = self.sites * self.rounds * self.facts_per_site_per_round
        if fact_names < 1 or facts > fact_names * len(ATTRIBUTES) // 2:
            problems.append(f"sites x rounds x facts_per_site_per_round = {facts} facts and "
                            f"{private} canaries: the lexicon's {NAMES_IN_LEXICON} names, "
                            f"{GENERAL_NAMES} kept for in-context tasks, leave "
                            f"{max(0, fact_names)} names (each canary takes one, a name carries "
                            f"up to {len(ATTRIBUTES) // 2} facts); use fewer sites, rounds, "
                            "facts or canaries")
        if problems:
            raise ValueError("invalid continual world spec: " + "; ".join(problems))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArrivedFact:
    """A fact and where and when it was first said: `users` stated it in round `round`."""

    fact: Fact
    site: str
    round: int
    users: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.fact.key


@dataclass(frozen=True)
class ArrivedCanary:
    """A private record (CANARY_FACTS facts about a name no other session mentions), said by
    one `user` in `sessions` (one for a once-said canary), first in round `round`."""

    facts: tuple[Fact, ...]
    site: str
    round: int
    user: str
    sessions: tuple[str, ...]
    rounds_said: tuple[int, ...]  # the round of each session, in the same order

    @property
    def repeats(self) -> int:
        return len(self.sessions)

    def row(self, values: Values) -> dict[str, Any]:
        """`canary_row` (what `fleetmind audit canaries` reads) with when, where and how often."""
        return {"site": self.site, "round": self.round, "user": self.user,
                "session": self.sessions[0], "sessions": list(self.sessions),
                "rounds_said": list(self.rounds_said), "repeats": self.repeats,
                **canary_row(self.facts, values)}


@dataclass(frozen=True)
class SessionRecord:
    """A session and what it holds: `stated` facts, then questions about `asked` facts (each
    answered truly), of a kind in SESSION_KINDS. `chat()` is the OpenAI chat record a site's
    store ingests."""

    id: str
    user: str
    site: str
    round: int
    kind: str
    stated: tuple[Fact, ...]
    asked: tuple[Fact, ...]

    def messages(self) -> list[dict[str, str]]:
        if self.stated:
            return session_messages(list(self.stated), list(self.asked))
        turns: list[tuple[str, str]] = []
        for fact in self.asked:  # a returning user asks without restating
            turns += [("user", question(fact)), ("assistant", answer(fact))]
        return chat(*turns)

    def chat(self) -> dict[str, Any]:
        return {"id": self.id, "user": self.user, "messages": self.messages()}


@dataclass(frozen=True)
class Probe:
    """A question about a fact in one `QUESTION_FORMS` form, closed-book (`messages`) and in
    context (`context_messages`: the fact stated alone, then the question), with the one
    answer that counts (`parse_answer`)."""

    fact: Fact
    site: str
    round: int
    form: str

    @property
    def question(self) -> str:
        return ask(self.fact, self.form)

    @property
    def messages(self) -> list[dict[str, str]]:
        return closed_book_prompt(self.fact, self.form)

    @property
    def context_messages(self) -> list[dict[str, str]]:
        return context_prompt([self.fact], self.fact, self.form)

    @property
    def answer(self) -> str:
        return answer(self.fact)

    def row(self) -> dict[str, Any]:
        return {"site": self.site, "round": self.round, "form": self.form, **asdict(self.fact),
                "question": self.question, "answer": self.answer, "messages": self.messages,
                "context_messages": self.context_messages}


@dataclass
class ContinualWorld:
    """Knowledge arriving over rounds; built by `make_continual_world`, deterministic from the
    spec. Rounds are numbered 0 .. spec.rounds-1; "before r" means rounds < r.

    Per round, per site: `sessions_for_round` (chat records) or `records_for_round` (the same
    with what each states and asks). Facts: `facts` (every one, in arrival order, each with
    its round), `facts_first_said(r)`, `facts_known_before(r)`. Probes: `probes(facts, form)`
    for any form in QUESTION_FORMS (PROBE_FORMS are those the base model reads in context).
    Canaries: `canaries` (each with its arrival round, user, sessions and repeats) and
    `canaries_arrived_before(r)`; `controls`, private records no session says, on names no
    session mentions (the reference for a said canary's exposure), and `twins`, each
    canary's secret on a name no session mentions (in the order of `canaries`): what the
    model says of anyone's, not that person's. `general` and `guard`
    are in-context tasks on names no fact or canary uses (as in `World`). `snapshot(r)` is
    the plain `World` of rounds 0..r. A user's id (`site-NN-uNNNN`) is the same in every
    round they come back in, so a cap on the rounds a user enters can be checked against
    `records`.
    """

    spec: ContinualSpec
    site_names: tuple[str, ...]
    facts: tuple[ArrivedFact, ...]
    canaries: tuple[ArrivedCanary, ...]
    records: dict[tuple[str, int], tuple[SessionRecord, ...]]
    general: list[dict[str, Any]]
    guard: list[dict[str, Any]]
    controls: tuple[tuple[Fact, ...], ...] = ()
    twins: tuple[tuple[Fact, ...], ...] = ()
    # Per attribute, the values a private record may hold: those no fact says where
    # spec.secrets_apart, else every value.
    secret_values: dict[str, tuple[str, ...]] = field(default_factory=lambda: lexicon().values)

    def canary_row(self, record: tuple[Fact, ...]) -> dict[str, Any]:
        """`canary_row` ranking each secret among the values a private record could take."""
        return canary_row(record, self.secret_values)

    def records_for_round(self, site: str, round: int) -> tuple[SessionRecord, ...]:
        self._check(site, round)
        return self.records[(site, round)]

    def sessions_for_round(self, site: str, round: int) -> list[dict[str, Any]]:
        """The chat records `site`'s users left in `round`, in the order they arrived."""
        return [record.chat() for record in self.records_for_round(site, round)]

    def sessions_through(self, site: str, round: int) -> list[dict[str, Any]]:
        """Every session `site` has seen in rounds 0..round."""
        return [s for r in range(round + 1) for s in self.sessions_for_round(site, r)]

    def facts_first_said(self, round: int, site: str | None = None) -> list[ArrivedFact]:
        self._check(site, round)
        return [f for f in self.facts if f.round == round and site in (None, f.site)]

    def facts_known_before(self, round: int, site: str | None = None) -> list[ArrivedFact]:
        """Facts first said in rounds < `round` (all of them at round = spec.rounds)."""
        self._check(site, 0)
        if not 0 <= round <= self.spec.rounds:
            raise ValueError(f"round={round}: use 0 to rounds={self.spec.rounds}")
        return [f for f in self.facts if f.round < round and site in (None, f.site)]

    def canaries_arriving(self, round: int, site: str | None = None) -> list[ArrivedCanary]:
        self._check(site, round)
        return [c for c in self.canaries if c.round == round and site in (None, c.site)]

    def canaries_arrived_before(self, round: int, site: str | None = None
                                ) -> list[ArrivedCanary]:
        """Canaries that arrived in rounds < `round` (a repeated one may still be said)."""
        self._check(site, 0)
        return [c for c in self.canaries if c.round < round and site in (None, c.site)]

    def probes(self, facts: list[ArrivedFact], form: str = "strict") -> list[Probe]:
        question_form(form)
        return [Probe(f.fact, f.site, f.round, form) for f in facts]

    def snapshot(self, round: int) -> World:
        """The plain `World` of rounds 0..round (sessions, facts, canaries said so far), for
        code written for `make_world`'s worlds (`basemodel.measure`, the demo's helpers)."""
        self._check(None, round)
        sites = []
        for name in self.site_names:
            arrived = self.canaries_arrived_before(round + 1, name)
            sites.append(Site(name=name,
                              facts=[f.fact for f in self.facts_known_before(round + 1, name)],
                              canaries=[c.facts for c in arrived if c.repeats == 1],
                              sessions=self.sessions_through(name, round),
                              repeated_canaries=[c.facts for c in arrived if c.repeats > 1]))
        return World(spec=self.spec, sites=sites, general=self.general, guard=self.guard)  # type: ignore[arg-type]

    def _check(self, site: str | None, round: int) -> None:
        if site is not None and site not in self.site_names:
            raise ValueError(f"unknown site {site!r}: this world has {list(self.site_names)}")
        if not 0 <= round < self.spec.rounds:
            raise ValueError(f"round={round}: this world has rounds 0 to {self.spec.rounds - 1}")


@dataclass
class _SiteLog:
    """What a site has seen while the world is built: who said which facts, and transcripts
    (a user's sessions must differ, or the site's store keeps one of them)."""

    name: str
    users: int = 0
    knowledge_users: dict[str, list[Fact]] = field(default_factory=dict)
    transcripts: set[tuple[str, str]] = field(default_factory=set)

    def new_user(self) -> str:
        self.users += 1
        return f"{self.name}-u{self.users - 1:04d}"

    def fresh(self, user: str, record: SessionRecord) -> bool:
        return (user, json.dumps(record.messages())) not in self.transcripts

    def keep(self, record: SessionRecord) -> SessionRecord:
        self.transcripts.add((record.user, json.dumps(record.messages())))
        return record


def make_continual_world(spec: ContinualSpec) -> ContinualWorld:
    """Builds the world round by round. Names are dealt once: GENERAL_NAMES for in-context
    tasks, one per canary, the rest for facts, so a private name is never a fact's, in any
    round. One generator draws facts and canaries in order; each (site, round) has its own for
    its sessions."""
    rng = random.Random(f"fleetmind-continual-{spec.seed}")
    names = rng.sample(lexicon().names, NAMES_IN_LEXICON)
    private_count = spec.sites * spec.rounds * (spec.canaries_per_site_per_round
                                                + spec.repeated_canaries_per_site_per_round)
    general_names = names[:GENERAL_NAMES]
    private_names = iter(names[GENERAL_NAMES:GENERAL_NAMES + private_count])
    fact_names = names[GENERAL_NAMES + private_count:]
    site_names = tuple(f"site-{index:02d}" for index in range(spec.sites))
    logs = {name: _SiteLog(name) for name in site_names}
    keys: set[tuple[str, str]] = set()
    facts: list[ArrivedFact] = []
    canaries: list[ArrivedCanary] = []
    records: dict[tuple[str, int], list[SessionRecord]] = {
        (site, r): [] for site in site_names for r in range(spec.rounds)}
    repeated_serial = dict.fromkeys(site_names, 0)
    for r in range(spec.rounds):
        for site in site_names:
            log, here = logs[site], records[(site, r)]
            local = random.Random(f"fleetmind-continual-{spec.seed}-{site}-{r}")
            new: list[Fact] = []
            while len(new) < spec.facts_per_site_per_round:
                fact = random_fact(rng, name=rng.choice(fact_names))
                if (fact.name, fact.attribute) not in keys:
                    keys.add((fact.name, fact.attribute))
                    new.append(fact)
            returning = sorted(log.knowledge_users)  # users of earlier rounds
            busy: set[str] = set()
            sayers: dict[Fact, list[str]] = {fact: [] for fact in new}
            for number, group in enumerate(_group_mentions(new, spec, local)):
                free = [u for u in returning if u not in busy]
                if free and local.random() < spec.returning_share:
                    user = local.choice(free)
                else:
                    user = log.new_user()
                busy.add(user)
                here.append(log.keep(SessionRecord(
                    f"{site}-t{r:02d}-s{number:03d}", user, site, r, "new", tuple(group),
                    tuple(local.sample(group, len(group))))))
                for fact in group:
                    sayers[fact].append(user)
            here += _recalls(log, [u for u in returning if u not in busy], site, r, spec, local)
            for fact in new:
                for user in sayers[fact]:
                    log.knowledge_users.setdefault(user, []).append(fact)
                facts.append(ArrivedFact(fact, site, r, tuple(sayers[fact])))
            for number in range(spec.canaries_per_site_per_round):
                record = private_record(rng, next(private_names))
                session = SessionRecord(f"{site}-t{r:02d}-c{number:03d}", log.new_user(), site, r,
                                        "canary", record, tuple(local.sample(record, len(record))))
                here.append(log.keep(session))
                canaries.append(ArrivedCanary(record, site, r, session.user, (session.id,), (r,)))
            for _ in range(spec.repeated_canaries_per_site_per_round):
                record = private_record(rng, next(private_names))
                user, serial = log.new_user(), repeated_serial[site]
                repeated_serial[site] += 1
                span = min(spec.canary_repeat_rounds, spec.rounds - r)
                ids, said = [], []
                tellings = local.sample(retellings(len(record)), spec.canary_repeats)
                for repeat, (stated, asked) in enumerate(tellings):
                    when = r + repeat % span
                    session = SessionRecord(f"{site}-t{when:02d}-r{serial:03d}-{repeat:02d}", user,
                                            site, when, "repeated_canary",
                                            tuple(record[i] for i in stated),
                                            tuple(record[i] for i in asked))
                    records[(site, when)].append(log.keep(session))
                    ids.append(session.id)
                    said.append(when)
                canaries.append(ArrivedCanary(record, site, r, user, tuple(ids), tuple(said)))
            local.shuffle(here)
    general = context_tasks("general", spec.general_tasks, general_names,
                            random.Random(f"fleetmind-continual-general-{spec.seed}"))
    guard = context_tasks("guard", spec.guard_tasks, general_names,
                          random.Random(f"fleetmind-continual-guard-{spec.seed}"))
    secret_values = dict(lexicon().values)
    if spec.secrets_apart:
        secret_values = _values_no_fact_says(facts)
        canaries, records = _secrets_apart(spec, canaries, records, secret_values)
    said_names = {name for name, _ in keys}
    controls, twins = _unsaid_records(spec, [n for n in fact_names if n not in said_names],
                                      canaries, secret_values)
    return ContinualWorld(spec=spec, site_names=site_names, facts=tuple(facts),
                          canaries=tuple(canaries),
                          records={key: tuple(value) for key, value in records.items()},
                          general=general, guard=guard, controls=controls, twins=twins,
                          secret_values=secret_values)


def _values_no_fact_says(facts: list[ArrivedFact]) -> dict[str, tuple[str, ...]]:
    """Per attribute, the lexicon's values that no fact of the world (any round) says."""
    said = {(f.fact.attribute, f.fact.value) for f in facts}
    left = {a: tuple(v for v in lexicon().values[a] if (a, v) not in said) for a in ATTRIBUTES}
    short = [f"{a} ({len(values)} left)" for a, values in left.items() if len(values) < 2]
    if short:
        raise ValueError(f"secrets_apart: the world's facts say nearly every value of "
                         f"{', '.join(short)}, leaving a canary's secret fewer than 2 values to "
                         "be ranked among; use fewer facts, or secrets_apart=False")
    return left


def _secrets_apart(spec: ContinualSpec, canaries: list[ArrivedCanary],
                   records: dict[tuple[str, int], list[SessionRecord]],
                   secret_values: dict[str, tuple[str, ...]]
                   ) -> tuple[list[ArrivedCanary], dict[tuple[str, int], list[SessionRecord]]]:
    """Each canary's values redrawn from `secret_values` by a generator of its own, in its
    record and in every session that says it; nothing else changes. A canary's name is no
    fact's, so (name, attribute) finds its facts alone."""
    rng = random.Random(f"fleetmind-continual-secrets-{spec.seed}")
    value = {(f.name, f.attribute): rng.choice(secret_values[f.attribute])
             for canary in canaries for f in canary.facts}

    def apart(facts: tuple[Fact, ...]) -> tuple[Fact, ...]:
        return tuple(replace(f, value=value.get((f.name, f.attribute), f.value)) for f in facts)

    return ([replace(c, facts=apart(c.facts)) for c in canaries],
            {key: [replace(r, stated=apart(r.stated), asked=apart(r.asked)) for r in recs]
             for key, recs in records.items()})


def _unsaid_records(spec: ContinualSpec, unsaid_names: list[str],
                    canaries: list[ArrivedCanary], secret_values: Values
                    ) -> tuple[tuple[tuple[Fact, ...], ...], tuple[tuple[Fact, ...], ...]]:
    """Records on names of `unsaid_names`, from a generator of their own (the rest of the
    world is the same whatever their number): `spec.control_canaries` private records, and
    each canary's twin (its secret, another name), in the order of `canaries`; a generator
    each, so the controls are the same with or without twins."""
    needed = spec.control_canaries + len(canaries)
    if len(unsaid_names) < needed:
        raise ValueError(f"control_canaries={spec.control_canaries}: {len(canaries)} canary "
                         f"twins and the controls need {needed} names no fact uses, and only "
                         f"{len(unsaid_names)} are left; use fewer control canaries, or fewer "
                         "facts or canaries")
    rng = random.Random(f"fleetmind-continual-controls-{spec.seed}")
    controls = tuple(private_record(rng, name, secret_values)
                     for name in rng.sample(unsaid_names, spec.control_canaries))
    taken = {control[0].name for control in controls}
    left = [name for name in unsaid_names if name not in taken]
    names = random.Random(f"fleetmind-continual-twins-{spec.seed}").sample(left, len(canaries))
    twins = tuple(tuple(replace(fact, name=name) for fact in canary.facts)
                  for canary, name in zip(canaries, names, strict=True))
    return controls, twins


def _group_mentions(new: list[Fact], spec: ContinualSpec, rng: random.Random
                    ) -> list[list[Fact]]:
    """Each new fact `users_per_fact` times, dealt into sessions of 1 to max_facts_per_session
    distinct facts of distinct attributes. Distinct attributes because the toy model reads a
    question about one of two same-attribute facts at chance between them (0.52 of 500 2-fact
    contexts, against 0.99 for distinct attributes; docs/continual-world.md), and the
    session is the teacher's context."""
    mentions = [fact for fact in new for _ in range(spec.users_per_fact)]
    return deal(mentions, spec.max_facts_per_session, rng,
                lambda fact, group: all(fact != f and fact.attribute != f.attribute
                                        for f in group))


_Telling = tuple[tuple[Fact, ...], tuple[Fact, ...]]  # facts stated, then facts asked


def _recalls(log: _SiteLog, free: list[str], site: str, r: int, spec: ContinualSpec,
             rng: random.Random) -> list[SessionRecord]:
    """Returning users come back to one of their own earlier facts: restate it and ask, or ask
    and get the true answer; each session unlike any of that user's earlier ones."""
    out: list[SessionRecord] = []
    free = list(free)
    while free and len(out) < spec.recalls_per_site_per_round:
        user = free.pop(rng.randrange(len(free)))
        fact = rng.choice(log.knowledge_users[user])
        restate: list[_Telling] = [((fact,), (fact,)), ((fact,), (fact, fact))]
        asking: list[_Telling] = [((), (fact,)), ((), (fact, fact))]
        first, second = (restate, asking) if rng.random() < 0.5 else (asking, restate)
        for stated, asked in first + second:
            record = SessionRecord(f"{site}-t{r:02d}-q{len(out):03d}", user, site, r,
                                   "restate" if stated else "ask", stated, asked)
            if log.fresh(user, record):
                out.append(log.keep(record))
                break
    return out


def write_continual_world(world: ContinualWorld, out: Path) -> Path:
    """Writes spec.json, rounds/rNN/sites/SITE/sessions.jsonl (chat JSONL, one folder per
    round), facts.jsonl (each with its round and users), probes.jsonl (every fact in every
    QUESTION_FORMS form), canaries.jsonl (`ArrivedCanary.row`), control_canaries.jsonl
    (`canary_row`: never said), general.jsonl and guard.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", {**asdict(world.spec), "digest": world.spec.digest(),
                                    "site_names": list(world.site_names)})
    for r in range(world.spec.rounds):
        for site in world.site_names:
            folder = out / "rounds" / f"r{r:02d}" / "sites" / site
            folder.mkdir(parents=True, exist_ok=True)
            write_lines(folder / "sessions.jsonl", world.sessions_for_round(site, r))
    write_lines(out / "facts.jsonl", [{"site": f.site, "round": f.round, **asdict(f.fact),
                                       "users": list(f.users)} for f in world.facts])
    write_lines(out / "probes.jsonl", [probe.row() for form in QUESTION_FORMS
                                       for probe in world.probes(list(world.facts), form)])
    write_lines(out / "canaries.jsonl", [c.row(world.secret_values) for c in world.canaries])
    write_lines(out / "control_canaries.jsonl", [world.canary_row(c) for c in world.controls])
    write_lines(out / "general.jsonl", world.general)
    write_lines(out / "guard.jsonl", [{"id": task["id"], "messages": task_prompt(task)}
                                      for task in world.guard])
    return out


def read_continual_world(folder: Path) -> ContinualWorld:
    """Reads a folder written by `write_continual_world` (the spec regenerates it exactly)."""
    spec_path = Path(folder) / "spec.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} not found: write a world with "
                                "`write_continual_world` first")
    raw = json.loads(spec_path.read_text())
    return make_continual_world(ContinualSpec(**{k: raw[k] for k in
                                                 ContinualSpec.__dataclass_fields__ if k in raw}))
