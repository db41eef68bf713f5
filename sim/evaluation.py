"""The demo's measures of a version against the base model, per site and fleet-wide:
closed-book accuracy on a site's own facts and on facts first seen at other sites
(transfer), the base model's in-context accuracy on those facts (the upper bound; recovery
is transfer over it), forgetting of the base model's in-context skill, and how many more
bits of other sites' canaries the version exposes than the base model does; and, when the
sites serve, the same closed-book accuracies on the answers their endpoints actually serve
(`Evaluator.served`). With the round each fact arrives in (`Evaluator.arrival`), also
recovery on the facts said so far, on those that arrived this round and on round 1's, and
`retention`: round 1's facts' recovery now over their best so far."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmind.sim import world as W


@dataclass
class Evaluator:
    """Everything measured against the base model, computed once."""

    world: W.World
    model_dir: Path
    # fact key -> the round (from 1) it arrives in; empty: no per-round measures of knowledge
    arrival: dict[str, int] = field(default_factory=dict)
    canaries: list[Any] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fleetmind.audit import exposure
        from fleetmind.client.model import load_model
        from fleetmind.sim.basemodel import answer_correct

        # (owner, times said, canary): the once-said ones, then the repeated ones.
        self.canaries = [(site.name, repeats, exposure.canary_from_row(W.canary_row(canary)))
                         for site in self.world.sites
                         for repeats, canaries in ((1, site.canaries),
                                                   (self.world.spec.canary_repeats,
                                                    site.repeated_canaries))
                         for canary in canaries]
        model, tokenizer = load_model(self.model_dir)
        self.base = self._measure(model, tokenizer)
        # Per fact, whether the base model answers it with the fact stated in context (the
        # teacher's accuracy): a site's upper bound is the share over its foreign facts.
        facts = [fact for _, fact in self.world.facts()]
        self.base["in_context_correct"] = dict(zip(
            [f.key for f in facts],
            answer_correct(model, tokenizer, [W.context_prompt([f], f) for f in facts],
                           [W.answer(f) for f in facts]), strict=True))
        self.base["upper_bound"] = {
            site.name: _mean([float(self.base["in_context_correct"][f.key])
                              for f in self.world.foreign_facts(site.name)])
            for site in self.world.sites}

    def _measure(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from fleetmind.audit.exposure import canary_exposure
        from fleetmind.sim.basemodel import answer_correct, measure

        exposure = canary_exposure(model, tokenizer, [c for _, _, c in self.canaries])
        facts = [fact for _, fact in self.world.facts()]
        correct = dict(zip([f.key for f in facts], answer_correct(
            model, tokenizer, [W.closed_book_prompt(f) for f in facts],
            [W.answer(f) for f in facts]), strict=True))
        return {
            "incontext": measure(model, tokenizer, self.world)["incontext_accuracy"],
            "correct": correct,  # closed-book, per fact key
            "closed_book": {site.name: _mean([float(correct[f.key]) for f in site.facts])
                            for site in self.world.sites},
            "exposure": exposure,
        }

    def recovery(self, correct: dict[str, bool], facts: list[W.Fact]) -> float | None:
        """`recovery` on `facts`: the share `correct` (fact key -> answered closed-book)
        over the base model's share in context; None for no facts."""
        return recovery([correct[f.key] for f in facts],
                        [self.base["in_context_correct"][f.key] for f in facts])

    def _knowledge(self, correct: dict[str, bool], site: str, round: int, prefix: str = ""
                   ) -> dict[str, float | None]:
        """Recovery on `site`'s foreign facts said by `round`, on those that arrived in it and
        on round 1's (None before round 1); nothing without `arrival`."""
        if not self.arrival:
            return {}
        foreign = [(self.arrival[f.key], f) for f in self.world.foreign_facts(site)]
        return {
            f"{prefix}recovery_known": self.recovery(correct, [f for r, f in foreign
                                                               if r <= round]),
            f"{prefix}recovery_new": self.recovery(correct, [f for r, f in foreign
                                                             if r == round]),
            f"{prefix}recovery_round1": self.recovery(correct, [f for r, f in foreign
                                                                if r == 1 and round >= 1]),
        }

    def version(self, folder: Path, round: int | None = None) -> dict[str, Any]:
        """Per-site and fleet-wide numbers for the version in `folder` (a PEFT adapter, loaded
        as any serving stack would load it) after `round`."""
        from peft import PeftModel

        from fleetmind.client.model import load_model

        model, tokenizer = load_model(self.model_dir)
        return self.compare(PeftModel.from_pretrained(model, folder).eval(), tokenizer, round)

    def compare(self, model: Any, tokenizer: Any, round: int | None = None) -> dict[str, Any]:
        """Per-site and fleet-wide numbers for `model` against the base model."""
        return self.summarize(self._measure(model, tokenizer), round)

    def summarize(self, measured: dict[str, Any], round: int | None = None) -> dict[str, Any]:
        """Fleet-wide means and a row per site; with `round` and `arrival`, also the facts
        said by that round (`facts_known`), those that arrived in it (`facts_new`) and each
        site's recovery on them and on round 1's (`recovery_known`, `recovery_new`,
        `recovery_round1`, None where no such fact is said yet)."""
        # Every canary's gain over the base model; each site's means are over other sites'.
        canaries = [{"site": owner, "repeats": repeats, "bits": after - before}
                    for (owner, repeats, _), after, before
                    in zip(self.canaries, measured["exposure"], self.base["exposure"],
                           strict=True)]
        sites = []
        for site in self.world.sites:
            others = [s for s in self.world.sites if s.name != site.name]
            transfer = _mean([measured["closed_book"][s.name] * len(s.facts) for s in others],
                             [len(s.facts) for s in others])
            upper = self.base["upper_bound"][site.name]
            once = [c["bits"] for c in canaries if c["site"] != site.name and c["repeats"] == 1]
            repeated = [c["bits"] for c in canaries
                        if c["site"] != site.name and c["repeats"] > 1]
            sites.append({
                "site": site.name,
                "own_accuracy": measured["closed_book"][site.name],
                "transfer_accuracy": transfer,
                "incontext_upper_bound": upper,
                "recovery": transfer / upper if upper else 0.0,
                "forgetting_points": 100 * (self.base["incontext"] - measured["incontext"]),
                "canary_exposure_bits": _mean(once),
                **({"repeated_canary_exposure_bits": _mean(repeated)} if repeated else {}),
                **(self._knowledge(measured["correct"], site.name, round)
                   if round is not None else {}),
            })
        fleet = {key: _site_mean([s[key] for s in sites]) for key in sites[0] if key != "site"}
        if self.arrival and round is not None:
            fleet["facts_known"] = sum(r <= round for r in self.arrival.values())
            fleet["facts_new"] = sum(r == round for r in self.arrival.values())
        return {**fleet, "sites": sites, "canaries": canaries}

    def served(self, endpoints: dict[str, str], round: int | None = None) -> dict[str, Any]:
        """Closed-book accuracy on what each site's endpoint answers: users at every site
        ask about their own site's facts and every other site's through their own endpoint
        (the official openai client over HTTP, greedy, `store: false` so an exam never
        becomes a session). Fleet-wide means and a row per site; with `round` and `arrival`,
        also `served_recovery_known` and the rest of `summarize`'s, on the answers served."""
        from concurrent.futures import ThreadPoolExecutor

        def exam(site: W.Site) -> dict[str, Any]:
            facts = self.world.foreign_facts(site.name)
            own = served_correct(endpoints[site.name], site.facts)
            foreign = served_correct(endpoints[site.name], facts)
            upper = self.base["upper_bound"][site.name]
            transfer = _mean([float(c) for c in foreign])
            knowledge = ({} if round is None else self._knowledge(
                dict(zip([f.key for f in facts], foreign, strict=True)), site.name, round,
                prefix="served_"))
            return {"site": site.name, "served_own_accuracy": _mean([float(c) for c in own]),
                    "served_transfer_accuracy": transfer,
                    "served_recovery": transfer / upper if upper else 0.0, **knowledge,
                    "served_questions": len(own) + len(foreign)}

        with ThreadPoolExecutor(len(self.world.sites)) as pool:  # every site at once
            sites = list(pool.map(exam, self.world.sites))
        fleet = {key: _site_mean([s[key] for s in sites])
                 for key in sites[0] if key.startswith("served_") and key != "served_questions"}
        return {**fleet, "served_questions": sum(s["served_questions"] for s in sites),
                "sites": sites}


def served_correct(url: str, facts: list[W.Fact]) -> list[bool]:
    """Asks `url`'s endpoint each fact's closed-book question, one user turn as
    `W.closed_book_prompt` writes it; whether each served answer is exactly right."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        return [W.parse_answer(api.chat.completions.create(
            model="fleetmind", messages=W.closed_book_prompt(fact),  # type: ignore[arg-type]
            temperature=0, store=False, user="fleetmind-demo-exam",
        ).choices[0].message.content or "", fact) for fact in facts]
    finally:
        api.close()


def recovery(closed_book: Sequence[bool], in_context: Sequence[bool]) -> float | None:
    """Closed-book accuracy over the base model's in-context accuracy on the same facts in
    the same form (what distillation could at best store); None for no facts, 0.0 where
    the base model reads none of them in context."""
    if len(closed_book) != len(in_context):
        raise ValueError(f"{len(closed_book)} closed-book answers against {len(in_context)} "
                         "in-context ones: pass both for the same facts")
    if not closed_book:
        return None
    upper = sum(in_context)
    return sum(closed_book) / upper if upper else 0.0


def retention(history: Sequence[float | None]) -> float | None:
    """Round 1's facts' recovery now over their best so far, from their recovery after each
    round 1 .. now; None in round 1 (nothing kept yet) and while their best is 0 or unmeasured."""
    if len(history) < 2 or any(value is None for value in history):
        return None
    best = max(value for value in history if value is not None)
    now = history[-1]
    return now / best if best and now is not None else None


def _site_mean(values: list[Any]) -> Any:
    """The fleet's number: the sites' mean, or None where a site has none."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def _mean(weighted: list[float], weights: list[int] | None = None) -> float:
    """sum(weighted) / sum(weights), every weight 1 when none are given; 0 when empty."""
    total = len(weighted) if weights is None else sum(weights)
    return sum(weighted) / total if total else 0.0
