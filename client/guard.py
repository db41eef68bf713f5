"""The forgetting guard's examples: general prompts and the frozen model's completions of
them, drawn once per consolidation, and the frozen model's log-probabilities on them, which
the loss (client/distill_loss.py) holds the student to. Kept apart from the loop
(client/distill.py) because the loss uses them and a site's consolidation
(client/consolidate.py) draws one guard set for all its units.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetmind.client import lora
from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.lessons import Messages
from fleetmind.client.sampling import row_log_probs, sample
from fleetmind.client.scoring import completion_logits
from fleetmind.client.tokens import chat_ids

# The guard's pool holds this many steps' worth of general prompts.
GUARD_POOL_STEPS = 8
# The frozen model's log-probabilities on the guard's pool are held when they fit in this; a
# large vocabulary pays a frozen pass per step instead (sizes: docs/measurements.md
# "Consolidation (OPSD)").
GUARD_REFERENCE_MB = 512
# The guard's rows go through the model this many at a time, sampled, forward and backward,
# to lower the memory peak at no cost in time (numbers: docs/measurements.md "Consolidation
# (OPSD)"; the sampling: docs/real-shapes.md "The system turn read once").
GUARD_MICRO_BATCH = 8


@dataclass(frozen=True)
class GuardExample:
    """A general input and the frozen model's completion of it, drawn once per consolidation
    (or once for several that start from the same frozen model)."""

    prompt: list[int]
    completion: list[int]


def guard_examples(model: Any, tokenizer: Any, prompts: Sequence[Messages], cfg: DistillConfig,
                   rng: random.Random, stop: set[int], generator: Any = None,
                   with_references: bool = False
                   ) -> tuple[list[GuardExample], list[Any] | None]:
    """The guard's examples, completions drawn once from the frozen model, GUARD_MICRO_BATCH
    rows at a time; with_references: also the frozen model's log-probabilities on each
    completion (what `hold_references` computes), read off the sampling itself, which
    computed them to draw each token, or None when they might not fit in
    GUARD_REFERENCE_MB.

    The guard holds the student next to the frozen model on these inputs, where the two
    samplers agree, so sampling them once instead of every step changes little and takes
    the guard's generation out of the loop (measured: docs/measurements.md "Consolidation
    (OPSD)")."""
    count = min(len(prompts), GUARD_POOL_STEPS * cfg.guard_prompts_per_step)
    prompt_ids = [chat_ids(tokenizer, p, generation=True) for p in rng.sample(list(prompts),
                                                                              count)]
    # The most the references can take: every completion at its longest.
    fits = (4 * count * cfg.max_new_tokens * model.config.vocab_size
            <= GUARD_REFERENCE_MB * 2**20)
    completions: list[list[int]] = []
    references: list[Any] | None = [] if with_references and fits else None
    with lora.frozen_global(model):
        for start in range(0, count, GUARD_MICRO_BATCH):
            steps: list[tuple[Any, Any]] = []
            batch = sample(model, tokenizer, prompt_ids[start:start + GUARD_MICRO_BATCH], 1,
                           cfg.max_new_tokens, cfg.temperature, stop, generator,
                           step_log_probs=None if references is None else steps)
            completions += batch
            if references is not None:
                references += row_log_probs(steps, [len(y) for y in batch], cfg.skip_first)
    return ([GuardExample(p, y) for p, y in zip(prompt_ids, completions, strict=True)],
            references)


def hold_references(model: Any, examples: Sequence[GuardExample],
                    cfg: DistillConfig) -> list[Any] | None:
    """The frozen model's log-probabilities on each example's completion, (tokens, V) each,
    computed once for a whole consolidation, or None when they would not fit in
    GUARD_REFERENCE_MB. Exact to hold: neither the frozen model nor the examples change while
    B trains, so one pass over the pool replaces a frozen pass over each step's rows. For a
    guard set `consolidate` did not sample itself (whose references come off the sampling),
    computed after it recorded the frozen model: a guard set can outlive its frozen model
    (the demo's FedIT arm keeps one for every round). GUARD_MICRO_BATCH rows at a
    time: in larger batches this pass and the guard's sampling were the consolidation's
    memory peak (docs/measurements.md "Consolidation (OPSD)")."""
    import torch

    counts = [max(len(g.completion) - cfg.skip_first, 0) for g in examples]
    if 4 * sum(counts) * model.config.vocab_size > GUARD_REFERENCE_MB * 2**20:
        return None
    references: list[Any] = []
    for start in range(0, len(examples), GUARD_MICRO_BATCH):
        references += torch.split(
            guard_reference(model, examples[start:start + GUARD_MICRO_BATCH], cfg),
            counts[start:start + GUARD_MICRO_BATCH])
    return references


def guard_reference(model: Any, examples: Sequence[GuardExample],
                    cfg: DistillConfig) -> Any:
    """One frozen pass: the frozen model's log-probabilities on the examples' completions,
    rows concatenated (N, V)."""
    import torch

    with torch.no_grad(), lora.frozen_global(model):
        logits, _ = completion_logits(model, [g.prompt for g in examples],
                                      [g.completion for g in examples], cfg.skip_first)
    return torch.log_softmax(logits.float(), dim=-1)
