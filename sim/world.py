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

Two worlds share the lexicon and the grammar: `make_world(WorldSpec)` here, where every
fact is said at once, and `sim.continual_world.make_continual_world(ContinualSpec)`, where
knowledge arrives over rounds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
    general = context_tasks("general", spec.general_tasks, fresh_names, rng)
    # The forgetting guard's inputs: like the general tasks, but drawn apart from them, so
    # what forgetting is measured on is never trained on.
    guard = context_tasks("guard", spec.guard_tasks, fresh_names,
                          random.Random(f"fleetmind-guard-{spec.seed}"))
    return World(spec=spec, sites=sites, general=general, guard=guard)


def context_tasks(prefix: str, count: int, names: list[str], rng: random.Random
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
    groups = deal(mentions, spec.max_facts_per_session, rng,
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
    write_json(out / "spec.json", spec)
    probes, canaries = [], []
    for site in world.sites:
        folder = out / "sites" / site.name
        folder.mkdir(parents=True, exist_ok=True)
        write_lines(folder / "sessions.jsonl", site.sessions)
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
    write_lines(out / "probes.jsonl", probes)
    write_lines(out / "canaries.jsonl", canaries)
    write_lines(out / "general.jsonl", world.general)
    write_lines(out / "guard.jsonl", [{"id": task["id"], "messages": task_prompt(task)}
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


def deal(mentions: list[Fact], max_facts: int, rng: random.Random,
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


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
