"""The demo's FedIT arm: the fleet's sessions, distillation, clipping, noise and server
learning rate, but A trains too and the server averages A and B separately (FedIT, Zhang et
al. 2023, "Towards Building the Federated GPT"), so the merge rule is the only difference.

It runs in the demo's process, without gRPC or secure aggregation: the baseline needs the
sites' A deltas, which fleetmind's protocol never carries (A is public and frozen there).
Averaging factors is wrong because mean(B_i) mean(A_i) != mean(B_i A_i); this arm measures
what that costs in transfer, beside the exact merge, in the same run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class FeditArm:
    model_dir: Path
    distill: Any  # client.distill.DistillConfig, the fleet's
    guard: Sequence[Any]
    frozen_a_seed: int
    rank: int
    targets: tuple[str, ...]
    clip_norm: float
    privacy_unit: str
    noise_multiplier: float
    server_learning_rate: float
    seed: int = 0
    model: Any = None
    tokenizer: Any = None
    global_a: dict[str, np.ndarray] = field(default_factory=dict)
    global_b: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fleetmind.client import distill, lora
        from fleetmind.client.model import load_model

        model, self.tokenizer = load_model(self.model_dir)
        # The genesis version's adapter: A from the public seed, B zero, as the fleet starts.
        self.model = lora.attach_lora(model, seed=self.frozen_a_seed, rank=self.rank,
                                      alpha=2.0 * self.rank, targets=self.targets)
        self.global_a = lora.get_b(self.model, "A")
        self.global_b = lora.get_b(self.model)
        self.rng = np.random.default_rng(self.seed)
        # The teacher is the frozen base model throughout, so the guard's examples are too.
        self.guard_set = distill.guard_examples(self.model, self.tokenizer, self.guard,
                                                self.distill, random.Random(self.seed),
                                                distill.turn_end_ids(self.tokenizer))

    def round(self, sessions_per_site: Sequence[Sequence[Any]]) -> None:
        """One round: every session distilled alone from the global (A, B), each privacy
        unit's (dA, dB) clipped to C together (as the fleet's sites clip theirs under a
        session or user unit; a site unit here sums sessions distilled alone), summed over
        the cohort with Gaussian noise, then A and B each moved by the server learning rate
        times their mean over sites."""
        from fleetmind.aggregation import dp
        from fleetmind.aggregation.merge import flatten, unflatten
        from fleetmind.client import distill, lora
        from fleetmind.client.consolidate import lessons_from
        from fleetmind.client.scrub import scrub_text

        start = self._factors(self.global_a, self.global_b)
        shapes = {key: value.shape for key, value in start.items()}
        start_flat = flatten(start, shapes)
        total = np.zeros_like(start_flat)
        for sessions in sessions_per_site:
            users = {session.id: session.user or session.id for session in sessions}
            contributions = []
            for lesson in lessons_from(sessions)[0]:
                lora.set_b(self.model, self.global_a, "A")
                lora.set_b(self.model, self.global_b)
                lora.freeze_a(self.model, frozen=False)
                distill.consolidate(self.model, self.tokenizer, [lesson], self.guard,
                                    self.distill, scrub=lambda t: scrub_text(t)[0],
                                    progress=False, guard_set=self.guard_set)
                lora.freeze_a(self.model)
                after = self._factors(lora.get_b(self.model, "A"), lora.get_b(self.model))
                contributions.append(dp.Contribution(lesson.session_id, users[lesson.session_id],
                                                     flatten(after, shapes) - start_flat))
            if contributions:
                total += dp.clip_and_sum(contributions, self.clip_norm, self.privacy_unit)[0]
        noised = dp.add_gaussian_noise(total, self.noise_multiplier * self.clip_norm, self.rng)
        step = self.server_learning_rate / len(sessions_per_site)
        merged = unflatten((start_flat + step * noised).astype(np.float32), shapes)
        self.global_a = {name: merged[f"A:{name}"] for name in self.global_a}
        self.global_b = {name: merged[f"B:{name}"] for name in self.global_b}
        lora.set_b(self.model, self.global_a, "A")
        lora.set_b(self.model, self.global_b)

    @staticmethod
    def _factors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A and B of every module in one mapping: one vector to clip and noise together."""
        return {**{f"A:{name}": t for name, t in a.items()},
                **{f"B:{name}": t for name, t in b.items()}}
