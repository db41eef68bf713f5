"""The demo's measures of a version against the base model, per site and fleet-wide:
closed-book accuracy on a site's own facts and on facts first seen at other sites
(transfer), the base model's in-context accuracy on those facts (the upper bound; recovery
is transfer over it), forgetting of the base model's in-context skill, and how many more
bits of other sites' canaries the version exposes than the base model does; and, when the
sites serve, the same closed-book accuracies on the answers their endpoints actually serve
(`Evaluator.served`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmind.sim import world as W


@dataclass
class Evaluator:
    """Everything measured against the base model, computed once."""

    world: W.World
    model_dir: Path
    canaries: list[Any] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fleetmind.audit import exposure
        from fleetmind.client.model import load_model
        from fleetmind.sim.basemodel import fact_accuracy

        # (owner, times said, canary): the once-said ones, then the repeated ones.
        self.canaries = [(site.name, repeats, exposure.canary_from_row(W.canary_row(canary)))
                         for site in self.world.sites
                         for repeats, canaries in ((1, site.canaries),
                                                   (self.world.spec.canary_repeats,
                                                    site.repeated_canaries))
                         for canary in canaries]
        model, tokenizer = load_model(self.model_dir)
        self.base = self._measure(model, tokenizer)
        self.base["upper_bound"] = {
            site.name: fact_accuracy(model, tokenizer, self.world.foreign_facts(site.name),
                                     lambda f: W.context_prompt([f], f))
            for site in self.world.sites}

    def _measure(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        from fleetmind.audit.exposure import canary_exposure
        from fleetmind.sim.basemodel import fact_accuracy, measure

        exposure = canary_exposure(model, tokenizer, [c for _, _, c in self.canaries])
        return {
            "incontext": measure(model, tokenizer, self.world)["incontext_accuracy"],
            "closed_book": {site.name: fact_accuracy(model, tokenizer, site.facts)
                            for site in self.world.sites},
            "exposure": exposure,
        }

    def version(self, folder: Path) -> dict[str, Any]:
        """Per-site and fleet-wide numbers for the version in `folder` (a PEFT adapter, loaded
        as any serving stack would load it)."""
        from peft import PeftModel

        from fleetmind.client.model import load_model

        model, tokenizer = load_model(self.model_dir)
        return self.compare(PeftModel.from_pretrained(model, folder).eval(), tokenizer)

    def compare(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """Per-site and fleet-wide numbers for `model` against the base model."""
        return self.summarize(self._measure(model, tokenizer))

    def summarize(self, measured: dict[str, Any]) -> dict[str, Any]:
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
            })
        fleet = {key: sum(s[key] for s in sites) / len(sites)
                 for key in sites[0] if key != "site"}
        return {**fleet, "sites": sites, "canaries": canaries}

    def served(self, endpoints: dict[str, str]) -> dict[str, Any]:
        """Closed-book accuracy on what each site's endpoint answers: users at every site
        ask about their own site's facts and every other site's through their own endpoint
        (the official openai client over HTTP, greedy, `store: false` so an exam never
        becomes a session). Fleet-wide means and a row per site."""
        from concurrent.futures import ThreadPoolExecutor

        def exam(site: W.Site) -> dict[str, Any]:
            own = served_correct(endpoints[site.name], site.facts)
            foreign = served_correct(endpoints[site.name], self.world.foreign_facts(site.name))
            upper = self.base["upper_bound"][site.name]
            transfer = _mean([float(c) for c in foreign])
            return {"site": site.name, "served_own_accuracy": _mean([float(c) for c in own]),
                    "served_transfer_accuracy": transfer,
                    "served_recovery": transfer / upper if upper else 0.0,
                    "served_questions": len(own) + len(foreign)}

        with ThreadPoolExecutor(len(self.world.sites)) as pool:  # every site at once
            sites = list(pool.map(exam, self.world.sites))
        fleet = {key: sum(s[key] for s in sites) / len(sites)
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


def _mean(weighted: list[float], weights: list[int] | None = None) -> float:
    """sum(weighted) / sum(weights), every weight 1 when none are given; 0 when empty."""
    total = len(weighted) if weights is None else sum(weights)
    return sum(weighted) / total if total else 0.0
