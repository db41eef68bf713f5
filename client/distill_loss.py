"""The loss OPSD minimises: the per-token reverse KL of the student to each row's teacher on
the student's own samples, averaged per row and summed per unit, with the guard's KL to the
frozen model beside it, and `backpropagate`, which accumulates one step's gradient. Kept
apart from the loop (client/distill.py), which picks each step's prompts, has the student
sample on them and steps the optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleetmind.client.distill_config import DistillConfig, resolve_top_k
from fleetmind.client.guard import GUARD_MICRO_BATCH, GuardExample, guard_reference
from fleetmind.client.lessons import LessonBatch
from fleetmind.client.sampling import read_prompts
from fleetmind.client.scoring import TeacherContexts, completion_logits


def reverse_kl(student_logits: Any, teacher_logits: Any, top_k: int = 0) -> Any:
    """Per-token KL(p_s || p_t) = sum_v p_s (log p_s - log p_t): (B, T) from (B, T, V) logits.
    With top_k > 0 the sum runs over the student's top-k tokens plus one bucket holding the
    rest of both distributions' mass, for vocabularies too large to sum whole."""
    import torch

    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    if top_k <= 0 or top_k >= log_s.shape[-1]:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    top_s, index = log_s.topk(top_k, dim=-1)
    top_t = log_t.gather(-1, index)
    tail_s = torch.log1p(-top_s.exp().sum(-1).clamp(max=1 - 1e-6))
    tail_t = torch.log1p(-top_t.exp().sum(-1).clamp(max=1 - 1e-6))
    bucket_s = torch.cat([top_s, tail_s.unsqueeze(-1)], dim=-1)
    bucket_t = torch.cat([top_t, tail_t.unsqueeze(-1)], dim=-1)
    return (bucket_s.exp() * (bucket_s - bucket_t)).sum(-1)


def completion_mask(prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                    width: int, skip_first: int) -> Any:
    """(B, width) float mask over the logits that predict completion tokens, first
    `skip_first` of each completion left out. Logit t predicts token t + 1."""
    import torch

    mask = torch.zeros((len(prompt_lengths), width))
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        start = p - 1 + skip_first
        end = p - 1 + c
        if end > start:
            mask[i, start:end] = 1.0
    return mask


def unit_kl_sums(student_logits: Any, teacher_log_probs: Any, counts: Sequence[int],
                 top_k: int, row_units: Sequence[int], units: int) -> Any:
    """The per-token reverse KL averaged over each row's tokens, summed over each unit's rows
    that have any: (units,); a unit's sum over its number of such rows is docs/design.md's
    loss. Logits (N, V), the rows' tokens concatenated, `counts` tokens per row, row i of
    unit row_units[i]."""
    import torch

    kept = [(c, u) for c, u in zip(counts, row_units, strict=True) if c > 0]
    if not kept:
        return student_logits.sum() * torch.zeros(units, device=student_logits.device)
    per_token = reverse_kl(student_logits[None], teacher_log_probs[None], top_k)[0]  # (N,)
    device = per_token.device
    tokens = torch.tensor([c for c, _ in kept], device=device)
    owner = torch.repeat_interleave(torch.arange(len(kept), device=device), tokens)
    sums = per_token.new_zeros(len(kept)).index_add(0, owner, per_token)
    unit = torch.tensor([u for _, u in kept], device=device)
    return per_token.new_zeros(units).index_add(0, unit, sums / tokens.to(sums.dtype))


def rows_with_tokens(completions: Sequence[Sequence[int]], skip_first: int) -> int:
    return sum(len(y) > skip_first for y in completions)


def unit_rows_with_tokens(completions: Sequence[Sequence[int]], row_units: Sequence[int],
                          units: int, skip_first: int) -> list[int]:
    """Each unit's rows that have a token in the loss (at least 1, a divisor)."""
    rows = [0] * units
    for completion, unit in zip(completions, row_units, strict=True):
        rows[unit] += len(completion) > skip_first
    return [max(r, 1) for r in rows]


def backpropagate(model: Any, tokenizer: Any, contexts: TeacherContexts, lesson: LessonBatch,
                  guard: Sequence[GuardExample], references: Sequence[Any] | None,
                  cfg: DistillConfig) -> tuple[list[float], list[float]]:
    """Accumulates the gradient of lesson loss + guard_weight x guard loss into B and returns
    both losses, one per unit: the student (prompt only) against each row's teacher (its
    session's cached context + prompt), and on the guard's examples against the frozen
    model's log-probs (`references`, one per example, from `hold_references`; None: a frozen
    pass now). With several units (`lesson.units`) each unit's loss is its own rows' and the
    guard's examples go through once per unit, under its delta: the gradient of the units'
    summed losses is each unit's own in its own delta.

    The lesson's samples and the guard's examples take student passes of their own: one pass
    over both was a little faster but kept both graphs alive at once, a higher memory peak
    (docs/measurements.md "Consolidation (OPSD)", "Tried and not kept"). The guard's
    examples go GUARD_MICRO_BATCH at a time, each forward and backward on its own: the
    gradient of a sum is the sum of the gradients, and only one micro-batch's activations are
    alive."""
    import torch

    top_k = resolve_top_k(cfg.top_k, model.config.vocab_size)
    units, row_units = lesson.unit_count, lesson.row_units()
    # The teacher first: its pass is over before most of the student's graph is built.
    teacher, _ = contexts.log_probs(model, [p.session_id for p in lesson.prompts],
                                    [p.teacher_suffix for p in lesson.prompts],
                                    lesson.completions, lesson.owners, cfg.skip_first,
                                    lesson.units)
    read = lesson.student_read or read_prompts(model, [p.student for p in lesson.prompts],
                                               tokenizer.pad_token_id, lesson.units)
    student, counts = completion_logits(model, [], lesson.completions, cfg.skip_first,
                                        lesson.owners, read, lesson.units)
    loss = unit_kl_sums(student, teacher, counts, top_k, row_units, units) / torch.tensor(
        unit_rows_with_tokens(lesson.completions, row_units, units, cfg.skip_first),
        device=student.device)
    loss.sum().backward()
    rows = max(rows_with_tokens([g.completion for g in guard], cfg.skip_first), 1)
    guard_loss = torch.zeros(units)
    for start in range(0, len(guard), GUARD_MICRO_BATCH):
        examples = guard[start:start + GUARD_MICRO_BATCH]
        reference = (torch.cat(list(references[start:start + len(examples)]))
                     if references is not None else guard_reference(model, examples, cfg))
        every = [(unit, g) for unit in range(units) for g in examples]
        student, counts = completion_logits(
            model, [g.prompt for _, g in every], [g.completion for _, g in every],
            cfg.skip_first, units=None if lesson.units is None else [u for u, _ in every])
        share = unit_kl_sums(student, torch.cat([reference] * units), counts, top_k,
                             [u for u, _ in every], units) / rows
        (cfg.guard_step_weight * share.sum()).backward()
        guard_loss += share.detach().cpu()
    return loss.detach().cpu().tolist(), guard_loss.tolist()
