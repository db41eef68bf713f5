"""One consolidation's settings (`DistillConfig`), the ones a site distils each privacy unit
with (`per_unit_config`), and the top_k a run resolves to (`resolve_top_k`). Kept apart from
the loop (client/distill.py) because the guard and the loss, which the loop imports, take
them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# top_k = AUTO_TOP_K: the whole vocabulary up to FULL_KL_MAX_VOCAB tokens, else the
# student's top AUTO_TOP_K_TOKENS plus a tail bucket, a lower bound of the full KL that saves
# its (tokens, vocabulary) tensors (docs/models.md "Large vocabularies").
AUTO_TOP_K = -1
FULL_KL_MAX_VOCAB = 32768
AUTO_TOP_K_TOKENS = 256


@dataclass(frozen=True)
class DistillConfig:
    """One consolidation's settings, validated once here."""

    steps: int = 90
    lr: float = 5e-3
    prompts_per_step: int = 4
    samples_per_prompt: int = 4
    max_new_tokens: int = 12
    temperature: float = 1.0
    skip_first: int = 0
    # AUTO_TOP_K (-1): chosen from the vocabulary size (`resolve_top_k`); 0: the whole
    # vocabulary; K > 0: the student's top K plus a tail bucket.
    top_k: int = AUTO_TOP_K
    # A few guard rows at a high weight forget as little as many at a low one, in far less
    # time (the guard sweep: docs/measurements.md "Consolidation (OPSD)").
    guard_weight: float = 6.0
    guard_prompts_per_step: int = 4
    # The guard runs on every `guard_every`-th step, at guard_every x guard_weight, so its
    # expected gradient is the same, in less time (docs/measurements.md "Consolidation (OPSD)").
    guard_every: int = 2
    probe_ratio: float = 0.5
    dream_ratio: float = 0.3
    replay_ratio: float = 0.2
    dreams_per_lesson: int = 8
    dream_confidence: float = 0.5
    seed: int = 0
    # Adam moves every coordinate by about lr per step, so its delta's norm is mostly noise;
    # plain SGD keeps the delta in the gradients' few directions, which is what survives
    # clipping to a small norm (DP clips each session's or user's delta).
    optimizer: str = "adam"
    # "sft_transcript" is a BASELINE: cross-entropy on the whole transcript, which is what
    # memorises what a user said (the demo and the benchmark compare against it).
    method: str = "opsd"
    # Where and in what precision the site's model runs while it consolidates: cpu, cuda
    # (cuda:N) or mps; float32, bfloat16 or float16 (fp32, bf16, fp16 accepted). The adapter's
    # factors stay float32 whatever the base's dtype (PEFT keeps them so), and every loss is
    # computed in float32.
    device: str = "cpu"
    dtype: str = "float32"
    # Privacy units distilled side by side in one pass, each its own delta (`lora.UnitDeltas`):
    # the cost per unit falls with the pass (docs/measurements.md "Batched distillation").
    units_per_pass: int = 8

    @property
    def guard_step_weight(self) -> float:
        """The guard's weight on the steps it runs."""
        return self.guard_weight * self.guard_every

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                     "guard_every", "units_per_pass"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.temperature <= 0:
            problems.append("lr and temperature must be positive")
        if self.skip_first < 0 or self.guard_weight < 0:
            problems.append("skip_first and guard_weight must be >= 0")
        if self.top_k < AUTO_TOP_K:
            problems.append(f"top_k={self.top_k} must be -1 (auto), 0 (whole vocabulary) or "
                            "a number of tokens")
        ratios = (self.probe_ratio, self.dream_ratio, self.replay_ratio)
        if min(ratios) < 0 or sum(ratios) <= 0:
            problems.append(f"probe_ratio, dream_ratio, replay_ratio = {ratios}: need "
                            "non-negative ratios, not all zero")
        if self.method not in ("opsd", "sft_transcript"):
            problems.append(f"method={self.method!r} must be opsd or sft_transcript")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer={self.optimizer!r} must be adam or sgd")
        if not 0 <= self.dream_confidence <= 1:
            problems.append(f"dream_confidence={self.dream_confidence} must be in [0, 1]")
        from fleetmind.client.model import check_device, dtype_name

        try:
            object.__setattr__(self, "dtype", dtype_name(self.dtype))
            check_device(self.device)
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise ValueError("invalid distillation config: " + "; ".join(problems))


def per_unit_config(**changes: Any) -> DistillConfig:
    """The settings for distilling each privacy unit alone, as a site in a DP fleet does
    before it clips each unit's delta: plain SGD keeps a delta in its gradients' few
    directions, so the clip keeps its lesson where Adam's delta spreads over every
    coordinate (docs/design.md, "Per-session deltas with SGD"); 24 steps at lr 1.0 are the
    demo's and the continual benchmark's (docs/measurements.md, docs/continual.md).
    `changes` override any field."""
    return DistillConfig(**{"steps": 24, "lr": 1.0, "optimizer": "sgd", **changes})


def resolve_top_k(top_k: int, vocab_size: int) -> int:
    """The top_k a consolidation uses: `top_k` itself unless it is AUTO_TOP_K, which picks
    the whole vocabulary (0) up to FULL_KL_MAX_VOCAB tokens, else AUTO_TOP_K_TOKENS."""
    if top_k != AUTO_TOP_K:
        return top_k
    return 0 if vocab_size <= FULL_KL_MAX_VOCAB else AUTO_TOP_K_TOKENS
