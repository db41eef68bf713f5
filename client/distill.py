"""On-policy self-distillation (OPSD): a site's sessions become a LoRA B delta.

Student: the global model with the site's adapter, no session context.
Teacher: the same weights with the adapter disabled, the scrubbed session in its context.
For prompts x the student samples y at temperature 1 and minimises the per-token reverse
KL to the teacher on its own tokens (docs/design.md "OPSD, the learning core"); the
forgetting guard distils the adapted model toward the frozen model on general inputs that
both see alike.

Here: the loop, `consolidate` (and `supervise`, the SFT baseline), and what it reports. The
parts it runs are files of their own: its settings (distill_config.py), lessons and their
prompts (lessons.py), tokens (tokens.py), sampling (sampling.py), scoring completions and the
teachers' cached contexts (scoring.py), the forgetting guard (guard.py), dreaming (dreams.py)
and the loss (distill_loss.py).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetmind.client import lora
from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.distill_loss import backpropagate, completion_mask
from fleetmind.client.dreams import Dream, dream
from fleetmind.client.guard import GuardExample, guard_examples, hold_references
from fleetmind.client.lessons import Lesson, LessonBatch, LessonPrompt, Messages
from fleetmind.client.sampling import generate, read_prompts
from fleetmind.client.scoring import TeacherContexts
from fleetmind.client.tokens import chat_ids, model_device, pad_right, turn_end_ids

# Lessons dreamt in one pass, their drafts and answers decoded in one batch each
# (docs/real-shapes.md "The system turn read once").
DREAM_LESSONS_PER_PASS = 4


@dataclass
class DistillStats:
    """What a consolidation did. tokens: the completion tokens that entered the loss: the
    student's own samples in OPSD (not the forgetting guard's), the targets in `supervise`.
    loss and kl: one per step; guard_kl: one per step the guard ran (`guard_every`)."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    guard_kl: list[float] = field(default_factory=list)
    dreams_kept: int = 0
    dreams_rejected: int = 0
    turns_dropped: int = 0  # the sessions' oldest turns left out to fit the model's context

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, other: DistillStats) -> None:
        """Counts `other`'s consolidation into this one's (a site's units into its total)."""
        self.steps += other.steps
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.loss += other.loss
        self.kl += other.kl
        self.guard_kl += other.guard_kl
        self.dreams_kept += other.dreams_kept
        self.dreams_rejected += other.dreams_rejected


# ---- the loop ------------------------------------------------------------------------------

@dataclass
class ConsolidationResult:
    delta: dict[str, np.ndarray]  # B_after - B_before
    stats: DistillStats
    dreams: list[Dream]
    sessions: list[str]
    a_delta: dict[str, np.ndarray] | None = None  # A_after - A_before, where A trains (FedIT)


def consolidate(model: Any, tokenizer: Any, lessons: Sequence[Lesson],
                guard_prompts: Sequence[Messages], cfg: DistillConfig,
                replay: Sequence[tuple[Lesson, Dream]] = (),
                scrub: Callable[[str], str] | None = None,
                progress: bool = True,
                guard_set: Sequence[GuardExample] | None = None
                ) -> ConsolidationResult:
    """Trains the adapter's B on `lessons` and returns B_after - B_before.

    `model` is a PEFT model from `lora.attach_lora`; `guard_prompts` are general inputs
    (tasks that carry their own context included); `replay` pairs kept dreams from earlier
    sessions with their session, so old lessons are rehearsed. `guard_set`: the guard's
    examples from `guard_examples`, when several consolidations from the same frozen model
    share them (one per session), so they are sampled once."""
    return consolidate_units(model, tokenizer, [lessons], guard_prompts, cfg, replay, scrub,
                             progress, guard_set)[0]


def consolidate_units(model: Any, tokenizer: Any, units: Sequence[Sequence[Lesson]],
                      guard_prompts: Sequence[Messages], cfg: DistillConfig,
                      replay: Sequence[tuple[Lesson, Dream]] = (),
                      scrub: Callable[[str], str] | None = None,
                      progress: bool = True,
                      guard_set: Sequence[GuardExample] | None = None
                      ) -> list[ConsolidationResult]:
    """`consolidate` for each unit's lessons alone, every unit from the same B, and each
    unit's B_after - B_before. One unit trains the adapter itself. Several share every pass,
    each with its own delta (`lora.UnitDeltas`; of A too where A trains), its own draws (a
    generator seeded as one unit alone is) and its own loss, so a unit's delta is what
    distilling it alone gives, up to float rounding, in a fraction of the time
    (docs/learning-scale.md "Batched distillation"). Replay belongs to one unit: it is
    refused with several."""
    import torch

    lessons = [lesson for unit in units for lesson in unit]
    if not units or not all(units):
        raise ValueError("nothing to consolidate: no sessions given")
    if cfg.guard_weight > 0 and not guard_prompts:
        raise ValueError("the forgetting guard needs general prompts; pass guard_prompts or "
                         "set guard_weight=0")
    if replay and len(units) > 1:
        raise ValueError("replayed dreams would join every unit sharing the pass: replay "
                         "with one unit")
    torch.manual_seed(cfg.seed)
    one = len(units) == 1
    # One unit draws from torch's generator, as it always has; several, each from its own
    # seeded alike, which draws the same numbers on the CPU.
    generators = None if one else [_generator(model, cfg.seed) for _ in units]
    rngs = [random.Random(cfg.seed) for _ in units]
    stop = turn_end_ids(tokenizer, model)
    start = _factors(model)
    lora.hold_global(model)
    deltas = None if one else lora.UnitDeltas(model, len(units))
    try:
        optimizer = _optimizer(lora.trainable_parameters(model) if deltas is None
                               else deltas.parameters(), cfg)
        stats = [DistillStats() for _ in units]
        started = time.perf_counter()
        contexts = TeacherContexts.encode(
            model, {lesson.session_id: chat_ids(tokenizer, lesson.context, generation=False)
                    for lesson in [*lessons, *(replayed for replayed, _ in replay)]})
        dreams = [_dreams(model, tokenizer, unit, cfg, scrub, stats[u],
                          None if generators is None else generators[u], contexts)
                  for u, unit in enumerate(units)]
        pools = [_prompt_pool(tokenizer, contexts, unit, unit_dreams, replay)
                 for unit, unit_dreams in zip(units, dreams, strict=True)]
        weights = {"probe": cfg.probe_ratio, "dream": cfg.dream_ratio,
                   "replay": cfg.replay_ratio}
        sources = [[s for s in pool if pool[s] and weights[s] > 0] for pool in pools]
        if not all(sources):
            raise ValueError("no prompts to learn from: every source with a positive ratio is "
                             "empty")
        references = None
        if cfg.guard_weight <= 0:
            guard_set = []
        elif guard_set is None:
            guard_set, references = guard_examples(
                model, tokenizer, guard_prompts, cfg, rngs[0], stop,
                None if generators is None else generators[0], with_references=True)
            for rng in rngs[1:]:
                rng.setstate(rngs[0].getstate())
        if references is None and guard_set:
            references = hold_references(model, guard_set, cfg)
        bar = _progress(progress)
        task = bar.add_task("consolidate", total=cfg.steps, loss=float("nan"),
                            kl=float("nan"), tps=0.0)
        with bar:
            for step in range(cfg.steps):
                picks: list[LessonPrompt] = []
                for rng, pool, unit_sources in zip(rngs, pools, sources, strict=True):
                    picks += [rng.choices(pool[s])[0] for s in rng.choices(
                        unit_sources, weights=[weights[s] for s in unit_sources],
                        k=cfg.prompts_per_step)]
                chosen: list[int] = []
                if guard_set and step % cfg.guard_every == 0:
                    # Every unit draws the guard's rows, to stay in its own sequence; all
                    # draw the same ones, as each would alone.
                    draws = [rng.sample(range(len(guard_set)),
                                        min(cfg.guard_prompts_per_step, len(guard_set)))
                             for rng in rngs]
                    chosen = draws[0]
                batch = _lesson_batch(model, tokenizer, picks, cfg, stop,
                                      None if one else [u for u in range(len(units))
                                                        for _ in range(cfg.prompts_per_step)],
                                      generators)
                optimizer.zero_grad(set_to_none=True)
                kls, guards = backpropagate(
                    model, tokenizer, contexts, batch, [guard_set[i] for i in chosen],
                    None if references is None else [references[i] for i in chosen], cfg)
                optimizer.step()
                seconds = time.perf_counter() - started
                for u, unit_stats in enumerate(stats):
                    unit_stats.steps += 1
                    unit_stats.tokens += batch.distilled_tokens(cfg.skip_first, u)
                    unit_stats.loss.append(kls[u] + cfg.guard_step_weight * guards[u])
                    unit_stats.kl.append(kls[u])
                    if chosen:
                        unit_stats.guard_kl.append(guards[u])
                    unit_stats.seconds = seconds / len(units)
                bar.update(task, advance=1, loss=sum(s.loss[-1] for s in stats) / len(units),
                           kl=sum(kls) / len(units),
                           tps=sum(s.tokens for s in stats) / seconds)
        b_deltas, a_deltas = _unit_deltas(model, start, deltas)
    finally:
        if deltas is not None:
            deltas.detach()
    return [ConsolidationResult(delta, unit_stats, unit_dreams,
                                [lesson.session_id for lesson in unit], a_delta)
            for delta, a_delta, unit_stats, unit_dreams, unit
            in zip(b_deltas, a_deltas, stats, dreams, units, strict=True)]


def _factors(model: Any) -> dict[str, dict[str, np.ndarray]]:
    """The factors that train, by factor: B, and A where it trains."""
    return {factor: lora.get_b(model, factor)
            for factor in (("B", "A") if lora.a_trains(model) else ("B",))}


def _unit_deltas(model: Any, start: dict[str, dict[str, np.ndarray]],
                 deltas: lora.UnitDeltas | None
                 ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray] | None]]:
    """Each unit's delta of B and of A (None where A is frozen): the model's own change where
    one unit trained it, else the units' deltas."""
    if deltas is None:
        end = _factors(model)
        change = {factor: {name: end[factor][name] - start[factor][name]
                           for name in start[factor]} for factor in start}
        return [change["B"]], [change.get("A")]
    a_deltas: list[dict[str, np.ndarray] | None] = [None] * deltas.units
    if deltas.trains_a:
        a_deltas = list(deltas.unit_deltas("A"))
    return deltas.unit_deltas(), a_deltas


def _generator(model: Any, seed: int) -> Any:
    import torch

    generator = torch.Generator(device=model_device(model))
    generator.manual_seed(seed)
    return generator


def _dreams(model: Any, tokenizer: Any, lessons: Sequence[Lesson], cfg: DistillConfig,
            scrub: Callable[[str], str] | None, stats: DistillStats,
            generator: Any, contexts: TeacherContexts) -> list[Dream]:
    """A unit's kept dreams, DREAM_LESSONS_PER_PASS lessons at a time, counted in its
    stats."""
    kept_all: list[Dream] = []
    if cfg.dream_ratio > 0 and cfg.dreams_per_lesson > 0:
        for start in range(0, len(lessons), DREAM_LESSONS_PER_PASS):
            for kept, rejected in dream(model, tokenizer,
                                        lessons[start:start + DREAM_LESSONS_PER_PASS],
                                        cfg.dreams_per_lesson, cfg.max_new_tokens,
                                        cfg.dream_confidence, scrub, generator, contexts):
                kept_all += kept
                stats.dreams_rejected += rejected
        stats.dreams_kept = len(kept_all)
    return kept_all


def _prompt_pool(tokenizer: Any, contexts: TeacherContexts, lessons: Sequence[Lesson],
                 dreams: Sequence[Dream], replay: Sequence[tuple[Lesson, Dream]]
                 ) -> dict[str, list[LessonPrompt]]:
    """A unit's prompts by source: its sessions' own user turns, its dreams, the replay."""
    by_session = {lesson.session_id: lesson for lesson in lessons}
    return {source: [LessonPrompt.encode(tokenizer, contexts, lesson, p) for lesson, p in pairs]
            for source, pairs in (
                ("probe", [(lesson, p) for lesson in lessons for p in lesson.probes]),
                ("dream", [(by_session[d.session_id], d.prompt) for d in dreams]),
                ("replay", [(lesson, d.prompt) for lesson, d in replay]))}


def transcript_examples(tokenizer: Any, lessons: Sequence[Lesson]
                        ) -> list[tuple[list[int], list[int]]]:
    """SFT baseline: each session's whole transcript, after its first token, as targets."""
    out = []
    for lesson in lessons:
        ids = chat_ids(tokenizer, lesson.context, generation=False)
        out.append((ids[:1], ids[1:]))
    return out


def supervise(model: Any, tokenizer: Any, examples: Sequence[tuple[list[int], list[int]]],
              cfg: DistillConfig) -> ConsolidationResult:
    """BASELINE ONLY: cross-entropy fine-tuning of the adapter on (prompt ids, target ids)
    pairs, with cfg's steps, batch, lr and optimizer; returns B_after - B_before."""
    return supervise_units(model, tokenizer, [examples], cfg)[0]


def supervise_units(model: Any, tokenizer: Any,
                    units: Sequence[Sequence[tuple[list[int], list[int]]]],
                    cfg: DistillConfig) -> list[ConsolidationResult]:
    """`supervise` for each unit's examples alone, every unit from the same adapter, as
    `consolidate_units` batches OPSD: one unit trains the adapter itself; several share every
    pass, each with its own delta, its own draws and its own loss (the mean over its drawn
    rows' target tokens), so each unit's delta is what supervising it alone gives, up to
    float rounding. An example drawn n times a step is computed once and weighted n: a unit
    of one session draws the same transcript for every row."""
    import torch
    import torch.nn.functional as F

    if not units or not all(units):
        raise ValueError("nothing to supervise: a unit without examples")
    torch.manual_seed(cfg.seed)
    rngs = [random.Random(cfg.seed) for _ in units]
    draws = cfg.prompts_per_step * cfg.samples_per_prompt  # a unit's rows a step
    start = _factors(model)
    deltas = None if len(units) == 1 else lora.UnitDeltas(model, len(units))
    device = model_device(model)
    try:
        optimizer = _optimizer(lora.trainable_parameters(model) if deltas is None
                               else deltas.parameters(), cfg)
        stats = [DistillStats() for _ in units]
        started = time.perf_counter()
        for _ in range(cfg.steps):
            # (unit, example index) -> times drawn, in the order first drawn
            drawn = Counter((u, i) for u, (rng, examples) in enumerate(zip(rngs, units,
                                                                            strict=True))
                            for i in rng.choices(range(len(examples)), k=draws))
            batch = [units[u][i] for u, i in drawn]
            ids = pad_right([p + t for p, t in batch], tokenizer.pad_token_id)  # (B, T)
            mask = completion_mask([len(p) for p, _ in batch], [len(t) for _, t in batch],
                                   ids.shape[1], 0)[:, :-1].to(device)
            ids = ids.to(device)
            owner = torch.tensor([u for u, _ in drawn], device=device)
            weight = torch.tensor(list(drawn.values()), dtype=torch.float32, device=device)
            with lora.routed(model, None if deltas is None else owner[:, None]):
                logits = model(input_ids=ids).logits[:, :-1]
            target = ids[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   target.reshape(-1), reduction="none").view_as(target)
            by_unit = torch.zeros(len(units), device=device).index_add(
                0, owner, weight * (loss * mask).sum(1))
            tokens = torch.zeros(len(units), device=device).index_add(
                0, owner, weight * mask.sum(1))
            unit_losses = by_unit / tokens.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            unit_losses.sum().backward()  # a unit's delta sees its own loss only
            optimizer.step()
            for unit_stats, unit_loss, unit_tokens in zip(stats, unit_losses, tokens,
                                                          strict=True):
                unit_stats.steps += 1
                unit_stats.tokens += int(unit_tokens)
                unit_stats.loss.append(float(unit_loss.detach()))
        for unit_stats in stats:
            unit_stats.seconds = (time.perf_counter() - started) / len(units)
        b_deltas, a_deltas = _unit_deltas(model, start, deltas)
    finally:
        if deltas is not None:
            deltas.detach()
    return [ConsolidationResult(delta, unit_stats, [], [], a_delta)
            for delta, a_delta, unit_stats in zip(b_deltas, a_deltas, stats, strict=True)]


def _optimizer(params: Sequence[Any], cfg: DistillConfig) -> Any:
    import torch

    return (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
            else torch.optim.SGD(params, lr=cfg.lr))


def _lesson_batch(model: Any, tokenizer: Any, picks: Sequence[LessonPrompt],
                  cfg: DistillConfig, stop: set[int], units: list[int] | None = None,
                  generators: Sequence[Any] | None = None) -> LessonBatch:
    """The student samples on every picked prompt in one batch (each under its unit's delta,
    `units`); each sample is to be scored by its own session's teacher. The student's pass
    over the prompts is made with gradients and serves both the sampling and the loss: B
    does not change in between (on the toy model one model call of a step's 13 fewer)."""
    repeat = cfg.samples_per_prompt
    prompts = [p.student for p in picks]
    read = read_prompts(model, prompts, tokenizer.pad_token_id, units)
    ys, _ = generate(model, tokenizer, prompts, repeat, cfg.max_new_tokens, cfg.temperature,
                     stop, read=read, units=units, generators=generators)
    return LessonBatch(list(picks), [i for i in range(len(picks)) for _ in range(repeat)], ys,
                       read, units)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"),
                    TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("kl {task.fields[kl]:.4f}"),
                    TextColumn("{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn(),
                    disable=not enabled)
