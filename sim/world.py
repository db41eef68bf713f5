"""The toy world: entities with attributes, sites whose users state facts, and canaries.

Everything is deterministic from a seed. The *lexicon* (names, attributes, values, canary
words, grammar words) is fixed for all worlds, because the toy base model's vocabulary is
built from it; a world's seed only decides which name-value pairings are true where.

A canary is a private record: facts about a name nobody else mentions, stated once by one
user. It has the shape of knowledge, so a site's distillation learns it exactly as it learns
a fact (and no pattern scrubber can see it); only its count, one session, sets it apart.
That is what session-level DP must exploit: knowledge is repeated, secrets are not.
A *repeated* canary is one user's private record said again in each of several sessions
(an address pasted into every chat): as many sessions as a fact has users, but one user, so
only user-level DP can tell it from knowledge. It is the demo's positive control.

Sentences are space-separated words and punctuation, so the toy tokenizer (one token per
word) and any BPE tokenizer read the same text.

Grammar (the base model is trained on exactly these shapes, with pairings drawn afresh
for every training session, so no pairing has a fixed meaning and closed-book is chance):

    statement  the {attribute} of {name} is {value} .
    question   what is the {attribute} of {name} ?
    answer     the {attribute} of {name} is {value} .
    canary     the {attribute} of {private name} is {value} .  (CANARY_FACTS of them)

Sessions only ever ask in that one form ("strict"). `QUESTION_FORMS` adds forms no session
uses, for closed-book probes of whether a model learned the fact or the sentence; the
answer is the same sentence in every form.

Two worlds share the lexicon and the grammar: `make_world(WorldSpec)`, where every fact
is said at once, and `make_continual_world(ContinualSpec)`, where knowledge arrives over
rounds (see `ContinualWorld`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

ATTRIBUTES = ("color", "city", "pet", "food", "tool", "sport", "gem", "tree")
NAMES_IN_LEXICON = 512
VALUES_PER_ATTRIBUTE = 40
CANARY_WORDS = 32
BACKGROUND_NAMES = 512  # names only the toy model's training uses (sim/basemodel.py)
CANARY_LENGTH = 4  # words of the passcodes the base model saw in training
CANARY_FACTS = 2  # facts in one private record; the secret is their values
GRAMMAR_WORDS = ("the", "of", "is", "what", "?", ".", "my", "passcode", "noted")
ACK = "noted ."
GENERAL_MAX_FACTS = 4


@dataclass(frozen=True)
class Lexicon:
    names: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    canary_words: tuple[str, ...]
    background_names: tuple[str, ...]  # never in a world: the base model's own knowledge

    def words(self) -> list[str]:
        """Every word a world or the toy model's training can write, in a fixed order (the
        toy vocabulary)."""
        out = list(GRAMMAR_WORDS) + list(ATTRIBUTES) + list(self.names)
        for attribute in ATTRIBUTES:
            out += self.values[attribute]
        return out + list(self.canary_words) + list(self.background_names)


@cache
def lexicon() -> Lexicon:
    """Pronounceable made-up words, distinct across every pool (fixed seed, never changes)."""
    rng = random.Random(20261125)
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
              "br", "dr", "gl", "kr", "pl", "sk", "st", "tr", "zh", "sh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
    codas = ["", "n", "r", "l", "k", "x", "m", "s"]
    taken = set(GRAMMAR_WORDS) | set(ATTRIBUTES)

    def fresh(syllables: int) -> str:
        while True:
            word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables))
            word += rng.choice(codas)
            if word not in taken:
                taken.add(word)
                return word

    names = tuple(fresh(2) for _ in range(NAMES_IN_LEXICON))
    values = {a: tuple(fresh(2) for _ in range(VALUES_PER_ATTRIBUTE)) for a in ATTRIBUTES}
    canary_words = tuple(fresh(3) for _ in range(CANARY_WORDS))
    background_names = tuple(fresh(2) for _ in range(BACKGROUND_NAMES))
    return Lexicon(names, values, canary_words, background_names)


@dataclass(frozen=True)
class Fact:
    name: str
    attribute: str
    value: str

    @property
    def key(self) -> str:
        return f"{self.attribute}:{self.name}"


def statement(fact: Fact) -> str:
    return f"the {fact.attribute} of {fact.name} is {fact.value} ."


def question(fact: Fact) -> str:
    return f"what is the {fact.attribute} of {fact.name} ?"


def answer(fact: Fact) -> str:
    return statement(fact)


@dataclass(frozen=True)
class QuestionForm:
    """One way to ask about a fact. `template` names {attribute}, {name} and {value}; the
    expected answer is always `answer(fact)`, whatever the form."""

    name: str
    template: str
    in_sessions: bool  # whether any session ever asks this way

    def ask(self, fact: Fact) -> str:
        return self.template.format(attribute=fact.attribute, name=fact.name, value=fact.value)


# Forms use only the lexicon's words: "tell me the A of N ." or "N 's A ?" would need words
# the toy tokenizer lacks (they read as <unk>). No world's session asks in "attribute_first";
# the toy model's training asks 10 % of its questions that way, so the committed model reads
# it in context as well as the strict form (its report.json: 1.000 / 0.905 on 1 / 2 facts,
# strict 1.000 / 0.895), and "reverse" (value to name, the stretch) it was never trained to
# read: probe it only to show that.
QUESTION_FORMS = {form.name: form for form in (
    QuestionForm("strict", "what is the {attribute} of {name} ?", in_sessions=True),
    QuestionForm("attribute_first", "what {attribute} is {name} ?", in_sessions=False),
    QuestionForm("reverse", "{value} is the {attribute} of what ?", in_sessions=False),
)}
PROBE_FORMS = ("strict", "attribute_first")  # read in context >= 0.90 by the base model
OTHER_FORMS = tuple(f for f in PROBE_FORMS if not QUESTION_FORMS[f].in_sessions)


def question_form(name: str) -> QuestionForm:
    if name not in QUESTION_FORMS:
        raise ValueError(f"unknown question form {name!r}: use one of {sorted(QUESTION_FORMS)}")
    return QUESTION_FORMS[name]


def ask(fact: Fact, form: str = "strict") -> str:
    """The question about `fact` in the named form (`question(fact)` is the strict one)."""
    return question_form(form).ask(fact)


def canary_statement(words: tuple[str, ...] | list[str]) -> str:
    return "my passcode is " + " ".join(words) + " ."


def parse_answer(text: str, fact: Fact) -> bool:
    """An answer counts only when it is exactly the expected sentence (value and restated key)."""
    return " ".join(text.split()) == answer(fact)


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def session_messages(stated: list[Fact], asked: list[Fact], canary: tuple[str, ...] | None = None
                     ) -> list[dict[str, str]]:
    """A user states facts (and maybe a secret), then asks about facts; the assistant answers."""
    said = " ".join(statement(f) for f in stated)
    if canary is not None:
        said = (said + " " + canary_statement(canary)).strip()
    return chat(("user", said), ("assistant", ACK), *question_turns(asked))


def arrival_round(fact: int, rounds: int) -> int:
    """The round (from 1) in which a site's fact number `fact` (from 0) arrives when its
    facts arrive over `rounds` rounds (`WorldSpec.fact_rounds`, the demo's `schedule`)."""
    return fact % rounds + 1


def question_turns(asked: list[Fact], forms: Sequence[str] | None = None
                   ) -> list[tuple[str, str]]:
    """Each fact asked, in its form from `forms` (None: every one strict), and answered."""
    return [turn for fact, form in zip(asked, forms or ["strict"] * len(asked), strict=True)
            for turn in (("user", ask(fact, form)), ("assistant", answer(fact)))]


def context_prompt(stated: list[Fact], asked: Fact, form: str = "strict"
                   ) -> list[dict[str, str]]:
    """An in-context task: facts in the conversation, then a question about one of them."""
    return chat(("user", " ".join(statement(f) for f in stated)), ("assistant", ACK),
                ("user", ask(asked, form)))


def closed_book_prompt(asked: Fact, form: str = "strict") -> list[dict[str, str]]:
    return chat(("user", ask(asked, form)))


@dataclass(frozen=True)
class WorldSpec:
    """What a world is made of. Validated here, at the edge."""

    seed: int = 0
    sites: int = 4
    facts_per_site: int = 6
    users_per_fact: int = 3
    canaries_per_site: int = 2
    general_tasks: int = 200
    guard_tasks: int = 400
    max_facts_per_session: int = 2
    repeated_canaries_per_site: int = 0
    canary_repeats: int = 8  # sessions of each repeated canary, all by one user
    version: int = 2  # 2: canaries are private records, not passcodes
    # A site's facts arrive over this many rounds: fact i in round i mod fact_rounds (from
    # 0), and no session states facts of two rounds (the demo's rounds; 1: one round).
    fact_rounds: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.sites < 1:
            problems.append(f"sites={self.sites}: need at least 1 site")
        if self.facts_per_site < 1:
            problems.append(f"facts_per_site={self.facts_per_site}: need at least 1")
        if self.users_per_fact < 3:
            problems.append(f"users_per_fact={self.users_per_fact}: a fact must be stated by at"
                            " least 3 users, or it is not knowledge the fleet should spread")
        if self.canaries_per_site < 0 or self.general_tasks < 1 or self.guard_tasks < 0:
            problems.append("canaries_per_site and guard_tasks must be >= 0, general_tasks >= 1")
        if self.repeated_canaries_per_site < 0 or \
                not 2 <= self.canary_repeats <= len(retellings(CANARY_FACTS)):
            problems.append(f"repeated_canaries_per_site={self.repeated_canaries_per_site}, "
                            f"canary_repeats={self.canary_repeats}: need >= 0 and 2 to "
                            f"{len(retellings(CANARY_FACTS))} (a canary said once is an "
                            "ordinary one; each repeat is a different session)")
        if not 1 <= self.max_facts_per_session <= 4:
            problems.append(f"max_facts_per_session={self.max_facts_per_session}: use 1 to 4")
        if not 1 <= self.fact_rounds <= max(1, self.facts_per_site):
            problems.append(f"fact_rounds={self.fact_rounds}: use 1 to facts_per_site="
                            f"{self.facts_per_site} (every round needs a fact arriving)")
        capacity = NAMES_IN_LEXICON * len(ATTRIBUTES) // 2
        if self.sites * self.facts_per_site > capacity:
            problems.append(f"sites x facts_per_site = {self.sites * self.facts_per_site}: the"
                            f" lexicon holds at most {capacity}; use fewer sites or facts")
        private = self.sites * (self.canaries_per_site + self.repeated_canaries_per_site)
        if private + min(NAMES_IN_LEXICON, self.sites * self.facts_per_site) > NAMES_IN_LEXICON:
            problems.append(f"canaries_per_site + repeated_canaries_per_site: {private} canaries "
                            "need a name each that no fact uses, and the "
                            f"lexicon has {NAMES_IN_LEXICON} names; use fewer canaries, facts "
                            "or sites")
        if problems:
            raise ValueError("invalid world spec: " + "; ".join(problems))

    def fields(self) -> dict[str, Any]:
        """The spec as spec.json and the digest hold it: `fact_rounds` only when it is not 1,
        so a world made before facts arrived over rounds keeps its digest and spec.json."""
        fields = asdict(self)
        if self.fact_rounds == 1:
            del fields["fact_rounds"]
        return fields

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Site:
    name: str
    facts: list[Fact]
    canaries: list[tuple[Fact, ...]]
    sessions: list[dict[str, Any]] = field(default_factory=list)
    repeated_canaries: list[tuple[Fact, ...]] = field(default_factory=list)
    # session id -> the indices in `facts` of the facts it states (a canary's session, and
    # a repeated canary's, states none of them and is not here). Not written to disk.
    teaches: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class World:
    spec: WorldSpec  # or a ContinualSpec, for a `ContinualWorld.snapshot`
    sites: list[Site]
    general: list[dict[str, Any]]
    guard: list[dict[str, Any]]

    def facts(self) -> list[tuple[str, Fact]]:
        return [(site.name, fact) for site in self.sites for fact in site.facts]

    def foreign_facts(self, site_name: str) -> list[Fact]:
        """Facts first seen at other sites: what transfer is measured on."""
        return [fact for name, fact in self.facts() if name != site_name]


Values = Mapping[str, Sequence[str]]  # attribute -> the values a draw may take


def random_fact(rng: random.Random, name: str | None = None, attribute: str | None = None,
                values: Values | None = None) -> Fact:
    """A fact on `name` (else a random name) with a value from `values` (else the lexicon's)."""
    lex = lexicon()
    attribute = attribute or rng.choice(ATTRIBUTES)
    pool = (values or lex.values)[attribute]
    return Fact(name or rng.choice(lex.names), attribute, rng.choice(pool))


def random_canary(rng: random.Random) -> tuple[str, ...]:
    """A passcode: the base model's training sessions carry these in their user turns."""
    return tuple(rng.choice(lexicon().canary_words) for _ in range(CANARY_LENGTH))


def private_record(rng: random.Random, name: str, values: Values | None = None
                   ) -> tuple[Fact, ...]:
    """A canary: CANARY_FACTS facts about `name`, each of a different attribute."""
    attributes = rng.sample(ATTRIBUTES, CANARY_FACTS)
    return tuple(random_fact(rng, name=name, attribute=a, values=values) for a in attributes)


def make_world(spec: WorldSpec) -> World:
    rng = random.Random(f"fleetmind-world-{spec.seed}")
    lex = lexicon()
    # Distinct (name, attribute) keys across the whole world; a name may carry several attributes.
    keys: set[tuple[str, str]] = set()
    sites = []
    for index in range(spec.sites):
        facts: list[Fact] = []
        while len(facts) < spec.facts_per_site:
            fact = random_fact(rng)
            if (fact.name, fact.attribute) not in keys:
                keys.add((fact.name, fact.attribute))
                facts.append(fact)
        sites.append(Site(name=f"site-{index:02d}", facts=facts, canaries=[]))
    # Private names appear in no fact of any site, so a canary's facts are its own.
    fact_names = {name for name, _ in keys}
    private_names = iter(rng.sample([n for n in lex.names if n not in fact_names],
                                    spec.sites * spec.canaries_per_site))
    for site in sites:
        site.canaries = [private_record(rng, next(private_names))
                         for _ in range(spec.canaries_per_site)]

    for site in sites:
        site.sessions, site.teaches = _site_sessions(site, spec, rng)

    used_names = fact_names | {f.name for site in sites for c in site.canaries for f in c}
    used_names |= _add_repeated_canaries(sites, spec, used_names)
    fresh_names = [n for n in lex.names if n not in used_names]
    general = _context_tasks("general", spec.general_tasks, fresh_names, rng)
    # The forgetting guard's inputs: like the general tasks, but drawn apart from them, so
    # what forgetting is measured on is never trained on.
    guard = _context_tasks("guard", spec.guard_tasks, fresh_names,
                           random.Random(f"fleetmind-guard-{spec.seed}"))
    return World(spec=spec, sites=sites, general=general, guard=guard)


def _context_tasks(prefix: str, count: int, names: list[str], rng: random.Random
                   ) -> list[dict[str, Any]]:
    """In-context tasks on fresh entities, 1 to GENERAL_MAX_FACTS facts, cycling."""
    tasks = []
    for index in range(count):
        stated = [random_fact(rng, name=n)
                  for n in rng.sample(names, 1 + index % GENERAL_MAX_FACTS)]
        asked = rng.choice(stated)
        tasks.append({"id": f"{prefix}-{index:04d}", "facts": [asdict(f) for f in stated],
                      "asked": asdict(asked)})
    return tasks


def task_prompt(task: dict[str, Any]) -> list[dict[str, str]]:
    return context_prompt([Fact(**f) for f in task["facts"]], Fact(**task["asked"]))


def _site_sessions(site: Site, spec: WorldSpec, rng: random.Random
                   ) -> tuple[list[dict[str, Any]], dict[str, tuple[int, ...]]]:
    """Each fact stated by `users_per_fact` different users in separate sessions, each
    session's facts of one arrival round (`WorldSpec.fact_rounds`); each canary said once,
    by one user, in one session of its own, who then asks about it (so the site's teacher
    answers with it, as it would with any fact). The sessions, and which facts each states
    (`Site.teaches`)."""
    index = {fact: number for number, fact in enumerate(site.facts)}

    def arrival(fact: Fact) -> int:
        return arrival_round(index[fact], spec.fact_rounds)

    mentions = [fact for fact in site.facts for _ in range(spec.users_per_fact)]
    groups = _deal(mentions, spec.max_facts_per_session, rng,
                   lambda fact, group: fact not in group
                   and all(arrival(f) == arrival(fact) for f in group))
    # One user per session: a fact's mentions sit in distinct sessions, so distinct users.
    sessions: list[dict[str, Any]] = []
    teaches: dict[str, tuple[int, ...]] = {}
    for number, group in enumerate(groups):
        sessions.append({"id": f"{site.name}-s{number:04d}", "user": f"{site.name}-u{number:04d}",
                         "messages": session_messages(group, rng.sample(group, len(group)))})
        teaches[f"{site.name}-s{number:04d}"] = tuple(sorted(index[fact] for fact in group))
    for number, canary in enumerate(site.canaries):
        sessions.append({"id": f"{site.name}-c{number:04d}",
                         "user": f"{site.name}-u{len(groups) + number:04d}",
                         "messages": session_messages(list(canary),
                                                      rng.sample(canary, len(canary)))})
    rng.shuffle(sessions)
    return sessions, teaches


@cache
def retellings(facts: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Every distinct session about `facts` facts: the order they are stated in, then a
    non-empty sequence of them asked about. A user's sessions must differ, or the site's
    store keeps one of them (it drops a user's identical transcripts as re-uploads)."""
    orders = list(itertools.permutations(range(facts)))
    asked = [sequence for size in range(1, facts + 1)
             for sequence in itertools.permutations(range(facts), size)]
    return tuple(itertools.product(orders, asked))


def _add_repeated_canaries(sites: list[Site], spec: WorldSpec, taken: set[str]) -> set[str]:
    """Each site's repeated canaries, each said by one user in `canary_repeats` different
    sessions (`retellings`) dealt among the site's others. Drawn from a generator of their
    own, so a world without them is the same world as before they existed. Returns their
    private names."""
    if not spec.repeated_canaries_per_site:
        return set()
    rng = random.Random(f"fleetmind-repeated-canaries-{spec.seed}")
    names = rng.sample(sorted(n for n in lexicon().names if n not in taken),
                       spec.sites * spec.repeated_canaries_per_site)
    for site in sites:
        for number in range(spec.repeated_canaries_per_site):
            canary = private_record(rng, names.pop())
            site.repeated_canaries.append(canary)
            tellings = rng.sample(retellings(len(canary)), spec.canary_repeats)
            for repeat, (stated, asked) in enumerate(tellings):
                session = {"id": f"{site.name}-r{number:04d}-{repeat:02d}",
                           "user": f"{site.name}-r{number:04d}",
                           "messages": session_messages([canary[i] for i in stated],
                                                        [canary[i] for i in asked])}
                site.sessions.insert(rng.randrange(len(site.sessions) + 1), session)
    return {f.name for site in sites for c in site.repeated_canaries for f in c}


def write_world(world: World, out: Path) -> Path:
    """Writes sessions per site, probes (the strict question, and under `forms` the question
    in every QUESTION_FORMS form), canaries, general tasks, guard prompts (chat JSONL, the
    format `fleetmind client consolidate --guard` reads) and spec.json."""
    out.mkdir(parents=True, exist_ok=True)
    fields = world.spec.fields() if isinstance(world.spec, WorldSpec) else asdict(world.spec)
    spec = {**fields, "digest": world.spec.digest(),
            "sites": [site.name for site in world.sites]}
    _write_json(out / "spec.json", spec)
    probes, canaries = [], []
    for site in world.sites:
        folder = out / "sites" / site.name
        folder.mkdir(parents=True, exist_ok=True)
        _write_lines(folder / "sessions.jsonl", site.sessions)
        for fact in site.facts:
            probes.append({"site": site.name, **asdict(fact), "question": question(fact),
                           "answer": answer(fact),
                           "forms": {form: ask(fact, form) for form in QUESTION_FORMS}})
        for number, canary in enumerate(site.canaries):
            canaries.append({"site": site.name, "session": f"{site.name}-c{number:04d}",
                             "repeats": 1, **canary_row(canary)})
        for number, canary in enumerate(site.repeated_canaries):
            canaries.append({"site": site.name, "session": f"{site.name}-r{number:04d}-00",
                             "repeats": spec["canary_repeats"], **canary_row(canary)})
    _write_lines(out / "probes.jsonl", probes)
    _write_lines(out / "canaries.jsonl", canaries)
    _write_lines(out / "general.jsonl", world.general)
    _write_lines(out / "guard.jsonl", [{"id": task["id"], "messages": task_prompt(task)}
                                       for task in world.guard])
    return out


def canary_row(canary: tuple[Fact, ...], values: Values | None = None) -> dict[str, Any]:
    """A canary as `fleetmind audit canaries` reads it: the secret, the text that said it, and
    per fact the closed-book question, the true answer and every answer it could have been
    (the values of `values`, else the lexicon's, for its attribute)."""
    pools = values or lexicon().values
    return {"secret": " ".join(f.value for f in canary),
            "text": " ".join(statement(f) for f in canary),
            "slots": [{"messages": closed_book_prompt(f), "answer": answer(f),
                       "alternatives": [answer(Fact(f.name, f.attribute, v))
                                        for v in pools[f.attribute]]}
                      for f in canary]}


def read_world(folder: Path) -> World:
    """Reads a folder written by `write_world` (the spec regenerates it exactly)."""
    spec_path = Path(folder) / "spec.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} not found: write a world with "
                                "`fleetmind model world --out DIR` first")
    raw = json.loads(spec_path.read_text())
    if "rounds" in raw:
        raise ValueError(f"{spec_path} is a continual world (it has rounds): read it with "
                         "`read_continual_world`")
    fields = {k: raw[k] for k in WorldSpec.__dataclass_fields__ if k in raw and k != "sites"}
    spec = WorldSpec(sites=len(raw["sites"]), **fields)
    return make_world(spec)


# ---- the continual world ------------------------------------------------------------------

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

    def row(self, values: Values | None = None) -> dict[str, Any]:
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
    general = _context_tasks("general", spec.general_tasks, general_names,
                             random.Random(f"fleetmind-continual-general-{spec.seed}"))
    guard = _context_tasks("guard", spec.guard_tasks, general_names,
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
    return _deal(mentions, spec.max_facts_per_session, rng,
                 lambda fact, group: all(fact != f and fact.attribute != f.attribute
                                         for f in group))


def _deal(mentions: list[Fact], max_facts: int, rng: random.Random,
          fits: Callable[[Fact, list[Fact]], bool]) -> list[list[Fact]]:
    """Shuffles `mentions` and deals them into sessions of 1 to `max_facts` facts, each
    taken only where `fits(fact, session so far)`; a fact left over starts a later one."""
    rng.shuffle(mentions)
    groups: list[list[Fact]] = []
    while mentions:
        size = rng.randint(1, max_facts)
        group: list[Fact] = []
        for fact in list(mentions):
            if len(group) == size:
                break
            if fits(fact, group):
                group.append(fact)
                mentions.remove(fact)
        groups.append(group)
    return groups


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
    _write_json(out / "spec.json", {**asdict(world.spec), "digest": world.spec.digest(),
                                    "site_names": list(world.site_names)})
    for r in range(world.spec.rounds):
        for site in world.site_names:
            folder = out / "rounds" / f"r{r:02d}" / "sites" / site
            folder.mkdir(parents=True, exist_ok=True)
            _write_lines(folder / "sessions.jsonl", world.sessions_for_round(site, r))
    _write_lines(out / "facts.jsonl", [{"site": f.site, "round": f.round, **asdict(f.fact),
                                        "users": list(f.users)} for f in world.facts])
    _write_lines(out / "probes.jsonl", [probe.row() for form in QUESTION_FORMS
                                        for probe in world.probes(list(world.facts), form)])
    _write_lines(out / "canaries.jsonl", [c.row(world.secret_values) for c in world.canaries])
    _write_lines(out / "control_canaries.jsonl", [world.canary_row(c) for c in world.controls])
    _write_lines(out / "general.jsonl", world.general)
    _write_lines(out / "guard.jsonl", [{"id": task["id"], "messages": task_prompt(task)}
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
