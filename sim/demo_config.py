"""The demo's settings (`DemoConfig`), validated once, and what they hand to the fleet, the
distiller and the aggregator's privacy policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetmind.aggregation.dp import PRIVACY_UNITS
from fleetmind.aggregation.manifest import DEFAULT_RANK
from fleetmind.client.lora import MLP_TARGETS
from fleetmind.sim import world as W

MERGES = ("both", "exact", "fedit")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs. Every session is distilled alone for `steps` SGD steps (SGD keeps a
    session's delta in a few directions, so clipping keeps its lesson); each privacy unit's
    delta is clipped to `clip_norm`, and with DP the cohort's sum carries Gaussian noise. The
    aggregator applies `server_learning_rate` (default 0.5 x the sites) times the cohort's
    mean; the FedIT arm's own rate defaults to the fleet's, at most the number of sites
    (averaging factors adds a cross term that broke the model at a step of 2). Knowledge
    arrives over the rounds: a site's fact i, all its sessions, in round i mod rounds + 1
    (`sim.demo.schedule`), so `facts_per_site` must be at least `rounds`.

    Every default (down_proj only, two facts per site, sixteen users per fact, eight canaries
    and two repeated ones per site, multiplier 0.8) was chosen by the sweeps in
    docs/measurements.md ("How the defaults were chosen"), which also explains the repeated
    canaries, the positive control that only user-level DP hides."""

    sites: int = 4
    rounds: int = 2
    seed: int = 0
    out: Path = Path("out/demo")
    dp: bool = True
    secure_aggregation: bool = True
    dreams: bool = True
    steps: int = 24
    lr: float = 1.0
    clip_norm: float = 0.5
    noise_multiplier: float = 0.8
    server_learning_rate: float = 0.0
    fedit_server_learning_rate: float = 0.0
    epsilon_budget: float = 1000.0
    facts_per_site: int = 2
    users_per_fact: int = 16
    canaries_per_site: int = 8
    repeated_canaries_per_site: int = 2
    canary_repeats: int = 8
    privacy_unit: str = "user"
    rank: int = DEFAULT_RANK
    adapter_targets: tuple[str, ...] = ("down_proj",)
    # "both": the fleet (exact merge) and, beside it, the in-process FedIT arm; "exact": the
    # fleet alone; "fedit": the FedIT arm alone (in-process: the protocol never carries A).
    merge: str = "both"
    method: str = "opsd"  # or "sft_transcript": the baseline, sites fine-tune on transcripts
    # Each site serves its version at its own endpoint (`client serve`), its users chat with
    # it over HTTP and it captures their sessions; False: sites ingest the world's
    # transcripts. Off with merge="fedit", where no fleet (so no site) runs.
    endpoints: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if not self.server_learning_rate:
            object.__setattr__(self, "server_learning_rate", 0.5 * self.sites)
        if self.merge == "fedit":  # no site runs, so none serves
            object.__setattr__(self, "endpoints", False)
        if not self.dp:  # nothing bounds a user: each session is clipped alone
            object.__setattr__(self, "privacy_unit", "session")
        if not self.fedit_server_learning_rate:
            object.__setattr__(self, "fedit_server_learning_rate",
                               min(self.server_learning_rate, float(self.sites)))
        problems = []
        if self.sites < 3:
            problems.append(f"--sites {self.sites}: the aggregator's smallest cohort is 3 "
                            "sites (secure aggregation splits each site's secrets among two "
                            "others, and a sum of two tells each the other's update); use 3 "
                            "or more")
        if self.sites > 32:
            problems.append(f"--sites {self.sites}: every site is a process on this machine; "
                            "use at most 32 (Run on Flower scales further)")
        if self.rounds < 1:
            problems.append(f"--rounds {self.rounds}: use 1 or more")
        elif self.facts_per_site < self.rounds:
            problems.append(f"--rounds {self.rounds} needs --facts-per-site {self.rounds} or "
                            f"more (it is {self.facts_per_site}): a site's fact i arrives in "
                            "round i mod rounds + 1, and every round needs a fact arriving")
        if self.merge not in MERGES:
            problems.append(f"--merge {self.merge}: use both (the fleet's exact merge beside "
                            "the FedIT arm), exact (the fleet alone) or fedit (the FedIT arm "
                            "alone)")
        if self.privacy_unit not in PRIVACY_UNITS:
            problems.append(f"--privacy-unit {self.privacy_unit}: use session, user or site")
        if self.method not in ("opsd", "sft_transcript"):
            problems.append(f"method={self.method!r}: use opsd or sft_transcript")
        if self.rank < 1 or not self.adapter_targets or \
                not set(self.adapter_targets) <= set(MLP_TARGETS):
            problems.append(f"rank={self.rank}, adapter_targets={self.adapter_targets}: need "
                            f"rank >= 1 and targets among {', '.join(MLP_TARGETS)}")
        if self.steps < 1:
            problems.append(f"--steps {self.steps} must be at least 1")
        for name in ("lr", "clip_norm", "noise_multiplier", "server_learning_rate",
                     "fedit_server_learning_rate", "epsilon_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name}={value} must be a finite number > 0")
        if problems:
            raise ValueError("; ".join(problems))

    def world_spec(self) -> W.WorldSpec:
        return W.WorldSpec(seed=self.seed, sites=self.sites, facts_per_site=self.facts_per_site,
                           users_per_fact=self.users_per_fact,
                           canaries_per_site=self.canaries_per_site,
                           repeated_canaries_per_site=self.repeated_canaries_per_site,
                           canary_repeats=self.canary_repeats,
                           fact_rounds=self.rounds)  # a session's facts arrive in one round

    def distill(self) -> Any:
        return distill_config(self.steps, self.lr, self.seed, self.method, self.dreams)

    def privacy(self) -> dict[str, Any]:
        return privacy_policy(self.dp, self.clip_norm, self.noise_multiplier,
                              self.privacy_unit, self.epsilon_budget)

    def fleet(self) -> Any:
        """What the aggregator and the site processes run with (`sim.fleet.Fleet`)."""
        from fleetmind.sim.fleet import FleetSettings

        return FleetSettings(out=self.out, sites=self.sites, seed=self.seed,
                             secure_aggregation=self.secure_aggregation,
                             server_learning_rate=self.server_learning_rate, rank=self.rank,
                             adapter_targets=self.adapter_targets, privacy=self.privacy(),
                             distill=self.distill(), serve=self.endpoints)


def distill_config(steps: int, lr: float, seed: int, method: str, dreams: bool) -> Any:
    """Consolidation's settings with plain SGD (a session's delta stays in a few directions,
    so clipping keeps its lesson; Adam spreads it over every coordinate)."""
    from fleetmind.client.distill_config import per_unit_config

    off: dict[str, Any] = {} if dreams else {"dream_ratio": 0.0, "dreams_per_lesson": 0}
    return per_unit_config(steps=steps, lr=lr, seed=seed, method=method, **off)


def privacy_policy(dp: bool, clip_norm: float, noise_multiplier: float, privacy_unit: str,
                   epsilon_budget: float, participation_cap: int | None = None
                   ) -> dict[str, Any]:
    """DP off still sends through the same protocol, with noise too small to matter (the
    aggregator refuses zero noise: a round without it has no finite epsilon), and with
    each session clipped alone: there is no privacy unit to bound. participation_cap: K,
    the most rounds a unit enters (docs/privacy-budget.md), or None."""
    if dp:
        return {"clip_norm": clip_norm, "noise_multiplier": noise_multiplier,
                "privacy_unit": privacy_unit, "epsilon_budget": epsilon_budget,
                "participation_cap": participation_cap}
    return {"clip_norm": clip_norm, "noise_multiplier": 1e-6, "privacy_unit": "session",
            "epsilon_budget": 1e300}
