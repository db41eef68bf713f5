"""The in-process fleets beside the real one: the fleet's sessions, per-unit distillation,
clipping, noise and server learning rate, run in one process without gRPC or secure
aggregation, so one thing can differ from the fleet and be measured in the same run.

    merge="exact"  A frozen, B's deltas averaged: the fleet's own merge (with the distiller's
                   method "sft_transcript" it is the SFT baseline: sites fine-tune on
                   transcripts, merged exactly)
    merge="fedit"  A trains too and the server averages A and B separately (FedIT, Zhang et
                   al. 2023, "Towards Building the Federated GPT"); fleetmind's protocol never
                   carries A (it is public and frozen there), hence in-process. Averaging
                   factors is wrong because mean(B_i) mean(A_i) != mean(B_i A_i); this arm
                   measures what that costs, beside the exact merge.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

MERGES = ("exact", "fedit")


@dataclass
class InProcessFleet:
    model_dir: Path
    distill: Any  # client.distill_config.DistillConfig, the fleet's (its method included)
    guard: Sequence[Any]
    frozen_a_seed: int
    rank: int
    targets: tuple[str, ...]
    clip_norm: float
    privacy_unit: str
    noise_multiplier: float
    server_learning_rate: float
    merge: str = "fedit"
    seed: int = 0
    server_step_units: int | None = None  # as the aggregator's (merge.cohort_step)
    # K, the most rounds a privacy unit's sessions enter, held back at the "site" as the
    # fleet's sites hold them (aggregation.participation); None: every round's sessions.
    participation_cap: int | None = None
    model: Any = None
    tokenizer: Any = None
    global_a: dict[str, np.ndarray] = field(default_factory=dict)
    global_b: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fleetmind.client import lora
        from fleetmind.client.model import load_model

        if self.merge not in MERGES:
            raise ValueError(f"merge={self.merge!r}: use exact (A frozen, B averaged) or "
                             "fedit (A and B each averaged)")
        model, self.tokenizer = load_model(self.model_dir)
        # The genesis version's adapter: A from the public seed, B zero, as the fleet starts.
        self.model = lora.attach_lora(model, seed=self.frozen_a_seed, rank=self.rank,
                                      alpha=2.0 * self.rank, targets=self.targets)
        self.global_a = lora.get_b(self.model, "A")
        self.global_b = lora.get_b(self.model)
        self.rng = np.random.default_rng(self.seed)
        self.rounds_run = 0
        self.entered: dict[str, set[int]] = {}  # privacy unit -> rounds its sessions entered

    def round(self, sessions_per_site: Sequence[Sequence[Any]]) -> None:
        """One round: every session distilled alone from the global adapter (the factors the
        merge trains), each privacy unit's delta clipped to C (as the fleet's sites clip
        theirs; a site unit here sums sessions distilled alone), summed over the cohort with
        Gaussian noise, then each factor moved by the server learning rate (scaled to the
        round's units as the aggregator scales it) times its mean over sites."""
        from fleetmind.aggregation import dp
        from fleetmind.aggregation.merge import cohort_step, flatten, unflatten
        from fleetmind.client import lora

        self.rounds_run += 1
        sessions_per_site = [self._under_cap(i, sessions)
                             for i, sessions in enumerate(sessions_per_site)]
        start = self._factors(self.global_a, self.global_b)
        shapes = {key: value.shape for key, value in start.items()}
        start_flat = flatten(start, shapes)
        total = np.zeros_like(start_flat)
        units = 0
        guard_set = self._guard_set()
        for sessions in sessions_per_site:
            users = {session.id: session.user or session.id for session in sessions}
            contributions = []
            for lesson, delta in self._unit_deltas(sessions, guard_set):
                contributions.append(dp.Contribution(lesson, users[lesson],
                                                     flatten(delta, shapes)))
            if contributions:
                summed, norms = dp.clip_and_sum(contributions, self.clip_norm,
                                                cast(dp.PrivacyUnit, self.privacy_unit))
                total += summed
                units += len(norms)
        noised = dp.add_gaussian_noise(total, self.noise_multiplier * self.clip_norm, self.rng)
        step = cohort_step(self.server_learning_rate, units,
                           self.server_step_units) / len(sessions_per_site)
        merged = unflatten((start_flat + step * noised).astype(np.float32), shapes)
        self.global_b = {name: merged[f"B:{name}"] for name in self.global_b}
        if self.merge == "fedit":
            self.global_a = {name: merged[f"A:{name}"] for name in self.global_a}
        lora.set_b(self.model, self.global_a, "A")
        lora.set_b(self.model, self.global_b)

    def _under_cap(self, site: int, sessions: Sequence[Any]) -> list[Any]:
        """The site's sessions whose privacy unit is under the participation cap (all of them
        without one), the units counted into this round as a site records them."""
        from fleetmind.aggregation.participation import ParticipationCap, eligible_units
        from fleetmind.client.contribution import unit_id

        if self.participation_cap is None:
            return list(sessions)
        unit = {s.id: unit_id(cast(Any, self.privacy_unit), f"site-{site}", s)
                for s in sessions}
        allowed = set(eligible_units(unit.values(), self.entered,
                                     ParticipationCap(self.participation_cap), self.rounds_run))
        for name in allowed:
            self.entered.setdefault(name, set()).add(self.rounds_run)
        return [s for s in sessions if unit[s.id] in allowed]

    def _guard_set(self) -> list[Any]:
        """The forgetting guard's examples, drawn once a round from the global model, as each
        site draws them once for all its sessions (`consolidate_sessions`)."""
        from fleetmind.client import lora
        from fleetmind.client.guard import guard_examples
        from fleetmind.client.tokens import turn_end_ids

        if self.distill.method != "opsd" or self.distill.guard_weight <= 0:
            return []
        lora.set_b(self.model, self.global_a, "A")
        lora.set_b(self.model, self.global_b)
        lora.hold_global(self.model)
        return guard_examples(self.model, self.tokenizer, self.guard, self.distill,
                              random.Random(self.distill.seed),
                              turn_end_ids(self.tokenizer, self.model))[0]

    def _unit_deltas(self, sessions: Sequence[Any], guard_set: list[Any]
                     ) -> list[tuple[str, dict[str, np.ndarray]]]:
        """(session id, the change of the merge's factors from distilling that session
        alone), the sessions `units_per_pass` to a pass as a site distils its units
        (`distill.consolidate_units`, `distill.supervise_units`)."""
        from fleetmind.client import distill, lora
        from fleetmind.client.consolidate import fit_lessons, lessons_from
        from fleetmind.client.scrub import scrub_text

        lessons, _ = fit_lessons(self.model, self.tokenizer, lessons_from(sessions)[0],
                                 self.distill)
        size = self.distill.units_per_pass
        out = []
        for chunk in [lessons[i:i + size] for i in range(0, len(lessons), size)]:
            lora.set_b(self.model, self.global_a, "A")
            lora.set_b(self.model, self.global_b)
            lora.freeze_a(self.model, frozen=self.merge == "exact")
            if self.distill.method == "sft_transcript":
                results = distill.supervise_units(
                    self.model, self.tokenizer,
                    [distill.transcript_examples(self.tokenizer, [lesson]) for lesson in chunk],
                    self.distill)
            else:
                results = distill.consolidate_units(
                    self.model, self.tokenizer, [[lesson] for lesson in chunk], self.guard,
                    self.distill, scrub=lambda t: scrub_text(t)[0], progress=False,
                    guard_set=guard_set)
            lora.freeze_a(self.model)
            out += [(lesson.session_id, self._factors(result.a_delta or {}, result.delta))
                    for lesson, result in zip(chunk, results, strict=True)]
        return out

    def _factors(self, a: dict[str, np.ndarray], b: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
        """The factors the merge trains in one mapping: one vector to clip and noise."""
        trained = {f"B:{name}": t for name, t in b.items()}
        if self.merge == "fedit":
            trained = {**{f"A:{name}": t for name, t in a.items()}, **trained}
        return trained
