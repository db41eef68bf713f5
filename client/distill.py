"""On-policy self-distillation (OPSD): a site's sessions become a LoRA B delta.

Student: the global model with the site's adapter, no session context.
Teacher: the same weights with the adapter disabled, the scrubbed session in its context.
For prompts x the student samples y at temperature 1 and minimises the per-token reverse
KL to the teacher on its own tokens (DESIGN.md "OPSD"); the forgetting guard distils the
adapted model toward the frozen model on general inputs that both see alike.

Read top to bottom: config, prompt and token helpers, sampling, the teacher's cached
context, the loss, dreaming, then `consolidate`, the loop itself.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetmind.client import lora

Messages = list[dict[str, str]]
# The guard's pool holds this many steps' worth of general prompts.
GUARD_POOL_STEPS = 8


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
    top_k: int = 0
    guard_weight: float = 2.0
    guard_prompts_per_step: int = 24
    probe_ratio: float = 0.5
    dream_ratio: float = 0.3
    replay_ratio: float = 0.2
    dreams_per_lesson: int = 8
    dream_confidence: float = 0.5
    seed: int = 0
    # Adam moves every coordinate by about lr per step, so its delta's norm is mostly noise;
    # plain SGD keeps the delta in the gradients' few directions, which is what survives
    # clipping to a small norm (session-level DP).
    optimizer: str = "adam"
    # "sft_transcript" is a BASELINE: cross-entropy on the whole transcript, which is what
    # memorises what a user said (the demo and the benchmark compare against it).
    method: str = "opsd"

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.temperature <= 0:
            problems.append("lr and temperature must be positive")
        if self.skip_first < 0 or self.top_k < 0 or self.guard_weight < 0:
            problems.append("skip_first, top_k and guard_weight must be >= 0")
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
        if problems:
            raise ValueError("invalid distillation config: " + "; ".join(problems))


@dataclass(frozen=True)
class Lesson:
    """One scrubbed session, ready to teach: the teacher's context and the prompts from it."""

    session_id: str
    context: tuple[dict[str, str], ...]
    probes: tuple[tuple[dict[str, str], ...], ...]

    @classmethod
    def from_session(cls, session_id: str, messages: Messages) -> Lesson:
        probes = tuple((dict(m),) for m in messages if m["role"] == "user")
        if not probes:
            raise ValueError(f"session {session_id} has no user turn to learn from")
        return cls(session_id, tuple(dict(m) for m in messages), probes)


@dataclass(frozen=True)
class Dream:
    """A practice prompt the teacher wrote about a session, kept for replay."""

    session_id: str
    prompt: tuple[dict[str, str], ...]
    confidence: float


@dataclass
class DistillStats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    guard_kl: list[float] = field(default_factory=list)
    dreams_kept: int = 0
    dreams_rejected: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ---- tokens ------------------------------------------------------------------------------

def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]], generation: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_turn_prefix_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Tokens of `messages` followed by the opening of a new user turn: what the teacher
    continues to write a dream. Works for any chat template (cut at a marker)."""
    marker = "\u2063fleetmind-dream\u2063"
    text = tokenizer.apply_chat_template([*messages, {"role": "user", "content": marker}],
                                         tokenize=False)
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]


def pad_right(rows: Sequence[Sequence[int]], pad: int) -> Any:
    import torch

    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return ids


# ---- sampling ----------------------------------------------------------------------------

def sample(model: Any, tokenizer: Any, prompts: Sequence[list[int]], samples: int,
           max_new_tokens: int, temperature: float, stop_ids: set[int]) -> list[list[int]]:
    """`samples` completions per prompt from `model` as it is now (adapter on or off), each cut
    after its first stop token. Batched over prompts and samples; left-padded."""
    completions, _ = generate(model, tokenizer, [list(p) for p in prompts for _ in
                                                  range(samples)],
                               max_new_tokens, temperature, stop_ids)
    return completions


def greedy_confidence(model: Any, tokenizer: Any, prompts: Sequence[list[int]],
                      max_new_tokens: int, stop_ids: set[int]) -> list[float]:
    """Mean probability of each greedy answer's tokens: how sure the model is of it."""
    _, confidences = generate(model, tokenizer, [list(p) for p in prompts], max_new_tokens,
                               0.0, stop_ids)
    return confidences


def generate(model: Any, tokenizer: Any, rows: list[list[int]], max_new_tokens: int,
              temperature: float, stop_ids: set[int]) -> tuple[list[list[int]], list[float]]:
    """A plain KV-cached decoding loop (left-padded batch): sampling at `temperature`, or
    greedy when it is 0. Returns the completions, each cut after its first stop token, and
    the mean probability of each completion's chosen tokens."""
    import torch

    pad = tokenizer.pad_token_id
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(stop_ids))
    done = torch.zeros(len(rows), dtype=torch.bool)
    chosen, probs = [], []
    cache = None
    step_ids = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                        cache=cache, use_cache=True)
            cache = out.cache
            p = torch.softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
            if temperature > 0:
                scaled = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
                token = torch.multinomial(scaled, 1)[:, 0]
            else:
                token = p.argmax(-1)
            chosen.append(token)
            probs.append(p.gather(-1, token[:, None])[:, 0])
            done = done | torch.isin(token, stops)
            if bool(done.all()):
                break
            step_ids = token[:, None]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
    tokens = torch.stack(chosen, dim=1).tolist()  # (B, new)
    token_probs = torch.stack(probs, dim=1)
    completions, confidences = [], []
    for i, row in enumerate(tokens):
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
        completions.append(row[:cut])
        confidences.append(float(token_probs[i, :cut].mean()))
    return completions, confidences


# ---- the teacher's context, encoded once per session ---------------------------------------

@dataclass
class TeacherContext:
    """The KV cache of the teacher's privileged context (batch 1), reused for every sample."""

    ids: list[int]
    cache: Any

    @classmethod
    def encode(cls, model: Any, ids: list[int]) -> TeacherContext:
        import torch

        with torch.no_grad(), lora.frozen_global(model):
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
        return cls(ids, out.cache)

    def logits(self, model: Any, suffixes: Any) -> Any:
        """Frozen-model logits for context + each suffix: (B, S, V). The cache is copied, so
        it never changes."""
        import torch

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(suffixes.shape[0])
        with torch.no_grad(), lora.frozen_global(model):
            return model(input_ids=suffixes, cache=cache, use_cache=True).logits


def teacher_suffix(tokenizer: Any, context: TeacherContext, lesson_context: Sequence[dict],
                   prompt: Sequence[dict[str, str]]) -> list[int]:
    full = chat_ids(tokenizer, [*lesson_context, *prompt], generation=True)
    if full[: len(context.ids)] != context.ids:
        raise ValueError("the chat template does not render the session as a prefix of the "
                         "session plus a prompt; KV-cache reuse needs that")
    return full[len(context.ids):]


# ---- the loss ----------------------------------------------------------------------------

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


def distill_loss(model: Any, tokenizer: Any, teachers: Sequence[TeacherContext | None],
                 student_prompts: Sequence[list[int]], teacher_prompts: Sequence[list[int]],
                 completions: Sequence[list[int]], cfg: DistillConfig) -> tuple[Any, int]:
    """Reverse KL of the student (prompt only) to each row's teacher (its session's cached
    context + prompt, or, for None, the same prompt with the adapter off) on the student's
    own completions. One student pass for all rows; one teacher pass per context."""
    import torch

    pad = tokenizer.pad_token_id
    lengths = [len(y) for y in completions]
    student_ids = pad_right([list(p) + list(y) for p, y in
                             zip(student_prompts, completions, strict=True)], pad)  # (B, Ls)
    student_logits = model(input_ids=student_ids).logits  # (B, Ls, V)
    student_rows = _completion_rows(student_logits, [len(p) for p in student_prompts],
                                    lengths, cfg.skip_first)
    teacher_rows: list[Any] = [None] * len(completions)
    tokens = int(student_ids.numel())
    by_teacher: dict[int, list[int]] = {}
    for row, teacher in enumerate(teachers):
        by_teacher.setdefault(id(teacher), []).append(row)
    for rows in by_teacher.values():
        teacher = teachers[rows[0]]
        ids = pad_right([list(teacher_prompts[r]) + list(completions[r]) for r in rows], pad)
        if teacher is None:
            with torch.no_grad(), lora.frozen_global(model):
                logits = model(input_ids=ids).logits
        else:
            logits = teacher.logits(model, ids)  # (rows, Lt, V)
        tokens += int(ids.numel())
        picked = _completion_rows(logits, [len(teacher_prompts[r]) for r in rows],
                                  [lengths[r] for r in rows], cfg.skip_first)
        for r, tensor in zip(rows, picked, strict=True):
            teacher_rows[r] = tensor
    kept = [i for i, t in enumerate(student_rows) if t.shape[0] > 0]
    if not kept:
        return student_logits.sum() * 0.0, tokens
    per_token = reverse_kl(torch.cat([student_rows[i] for i in kept])[None],
                           torch.cat([teacher_rows[i] for i in kept])[None], cfg.top_k)[0]
    counts = torch.tensor([student_rows[i].shape[0] for i in kept])
    owner = torch.repeat_interleave(torch.arange(len(kept)), counts)
    sums = per_token.new_zeros(len(kept)).index_add(0, owner, per_token)
    return (sums / counts).mean(), tokens


def _completion_rows(logits: Any, prompt_lengths: Sequence[int],
                     completion_lengths: Sequence[int], skip_first: int) -> list[Any]:
    """Per row, the logits that predict its completion tokens, first `skip_first` left out:
    logit t predicts token t + 1. Each (len - skip_first, V)."""
    return [logits[i, p - 1 + skip_first : p - 1 + c]
            for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths, strict=True))]


# ---- dreaming ------------------------------------------------------------------------------

def dream(model: Any, tokenizer: Any, lesson: Lesson, count: int, max_new_tokens: int,
          threshold: float, scrub: Callable[[str], str] | None = None) -> tuple[list[Dream], int]:
    """The teacher, the session in context, writes the user's next turn `count` times.
    Duplicates, prompts already in the session, and prompts whose greedy answer the teacher
    gives with mean token probability below `threshold` are dropped. Returns kept, rejected."""

    user_end = turn_end_ids(tokenizer)
    prefix = user_turn_prefix_ids(tokenizer, lesson.context)
    with lora.frozen_global(model):
        drafts = sample(model, tokenizer, [prefix], count, max_new_tokens, 1.0, user_end)
    seen = {p[0]["content"] for p in lesson.probes}
    candidates = []
    for draft in drafts:
        text = tokenizer.decode([t for t in draft if t not in user_end],
                                skip_special_tokens=True).strip()
        text = scrub(text) if scrub else text
        if text and text not in seen:
            seen.add(text)
            candidates.append(({"role": "user", "content": text},))
    kept = []
    if candidates:
        prompts = [chat_ids(tokenizer, [*lesson.context, *p], generation=True) for p in candidates]
        with lora.frozen_global(model):
            confidences = greedy_confidence(model, tokenizer, prompts, max_new_tokens, user_end)
        kept = [Dream(lesson.session_id, prompt, confidence)
                for prompt, confidence in zip(candidates, confidences, strict=True)
                if confidence >= threshold]
    return kept, len(drafts) - len(kept)


def turn_end_ids(tokenizer: Any) -> set[int]:
    ends = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ends.add(token_id)
    return {t for t in ends if t is not None}


# ---- the loop ------------------------------------------------------------------------------

@dataclass
class ConsolidationResult:
    delta: dict[str, np.ndarray]
    stats: DistillStats
    dreams: list[Dream]
    sessions: list[str]


def consolidate(model: Any, tokenizer: Any, lessons: Sequence[Lesson],
                guard_prompts: Sequence[Messages], cfg: DistillConfig,
                replay: Sequence[tuple[Lesson, Dream]] = (),
                scrub: Callable[[str], str] | None = None,
                progress: bool = True,
                guard_set: Sequence[tuple[list[int], list[int]]] | None = None
                ) -> ConsolidationResult:
    """Trains the adapter's B on `lessons` and returns B_after - B_before.

    `model` is a PEFT model from `lora.attach_lora`; `guard_prompts` are general inputs
    (tasks that carry their own context included); `replay` pairs kept dreams from earlier
    sessions with their session, so old lessons are rehearsed. `guard_set`: the guard's
    examples from `guard_examples`, when several consolidations from the same frozen model
    share them (one per session), so they are sampled once."""
    import torch

    if not lessons:
        raise ValueError("nothing to consolidate: no sessions given")
    if cfg.guard_weight > 0 and not guard_prompts:
        raise ValueError("the forgetting guard needs general prompts; pass guard_prompts or "
                         "set guard_weight=0")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    stop = turn_end_ids(tokenizer)
    start_b = lora.get_b(model)
    lora.hold_global(model)
    optimizer = _optimizer(model, cfg)
    stats = DistillStats()
    started = time.perf_counter()

    contexts: dict[str, TeacherContext] = {}
    for lesson in [*lessons, *(replayed for replayed, _ in replay)]:
        if lesson.session_id not in contexts:
            contexts[lesson.session_id] = TeacherContext.encode(
                model, chat_ids(tokenizer, lesson.context, generation=False))

    dreams: list[Dream] = []
    if cfg.dream_ratio > 0 and cfg.dreams_per_lesson > 0:
        for lesson in lessons:
            kept, rejected = dream(model, tokenizer, lesson, cfg.dreams_per_lesson,
                                   cfg.max_new_tokens, cfg.dream_confidence, scrub)
            dreams += kept
            stats.dreams_rejected += rejected
        stats.dreams_kept = len(dreams)
    by_session = {lesson.session_id: lesson for lesson in lessons}
    pool = {
        "probe": [(lesson, p) for lesson in lessons for p in lesson.probes],
        "dream": [(by_session[d.session_id], d.prompt) for d in dreams],
        "replay": [(lesson, d.prompt) for lesson, d in replay],
    }
    weights = {"probe": cfg.probe_ratio, "dream": cfg.dream_ratio, "replay": cfg.replay_ratio}
    sources = [s for s in pool if pool[s] and weights[s] > 0]
    if not sources:
        raise ValueError("no prompts to learn from: every source with a positive ratio is empty")

    if cfg.guard_weight <= 0:
        guard_set = []
    elif guard_set is None:
        guard_set = guard_examples(model, tokenizer, guard_prompts, cfg, rng, stop)
    bar = _progress(progress)
    task = bar.add_task("consolidate", total=cfg.steps, loss=float("nan"), kl=float("nan"),
                        tps=0.0)
    with bar:
        for _ in range(cfg.steps):
            picks = [rng.choices(pool[s])[0] for s in rng.choices(
                sources, weights=[weights[s] for s in sources], k=cfg.prompts_per_step)]
            loss, kl, tokens = _lesson_step(model, tokenizer, contexts, picks, cfg, stop)
            guard = loss.new_zeros(())
            if guard_set:
                chosen = rng.sample(guard_set, min(cfg.guard_prompts_per_step, len(guard_set)))
                prompt_ids = [p for p, _ in chosen]
                guard, guard_tokens = distill_loss(model, tokenizer, [None] * len(chosen),
                                                   prompt_ids, prompt_ids,
                                                   [y for _, y in chosen], cfg)
                tokens += guard_tokens
            total = loss + cfg.guard_weight * guard
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            stats.steps += 1
            stats.tokens += tokens
            stats.loss.append(float(total.detach()))
            stats.kl.append(kl)
            stats.guard_kl.append(float(guard.detach()))
            stats.seconds = time.perf_counter() - started
            bar.update(task, advance=1, loss=stats.loss[-1], kl=kl, tps=stats.tokens_per_s)
    end_b = lora.get_b(model)
    delta = {name: end_b[name] - start_b[name] for name in start_b}
    return ConsolidationResult(delta, stats, dreams, [lesson.session_id for lesson in lessons])


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
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    start_b = lora.get_b(model)
    optimizer = _optimizer(model, cfg)
    stats = DistillStats()
    started = time.perf_counter()
    for _ in range(cfg.steps):
        batch = rng.choices(examples, k=cfg.prompts_per_step * cfg.samples_per_prompt)
        ids = pad_right([p + t for p, t in batch], tokenizer.pad_token_id)  # (B, T)
        mask = completion_mask([len(p) for p, _ in batch], [len(t) for _, t in batch],
                               ids.shape[1], 0)[:, :-1]
        logits = model(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                               reduction="none").view_as(target)
        loss = (loss * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stats.steps += 1
        stats.tokens += int(mask.sum())
        stats.loss.append(float(loss.detach()))
    stats.seconds = time.perf_counter() - started
    end_b = lora.get_b(model)
    return ConsolidationResult({name: end_b[name] - start_b[name] for name in start_b}, stats,
                               [], [])


def _optimizer(model: Any, cfg: DistillConfig) -> Any:
    import torch

    params = lora.trainable_parameters(model)
    return (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
            else torch.optim.SGD(params, lr=cfg.lr))


def guard_examples(model: Any, tokenizer: Any, prompts: Sequence[Messages], cfg: DistillConfig,
                   rng: random.Random, stop: set[int]) -> list[tuple[list[int], list[int]]]:
    """The guard's (prompt, completion) pairs, completions drawn once from the frozen model.

    The guard holds the student next to the frozen model on these inputs, where the two
    samplers agree, so sampling them once instead of every step changes little and takes
    the guard's generation out of the loop (measured: README "Consolidation")."""
    count = min(len(prompts), GUARD_POOL_STEPS * cfg.guard_prompts_per_step)
    prompt_ids = [chat_ids(tokenizer, p, generation=True) for p in rng.sample(list(prompts),
                                                                              count)]
    completions: list[list[int]] = []
    with lora.frozen_global(model):
        for start in range(0, count, 64):
            completions += sample(model, tokenizer, prompt_ids[start:start + 64], 1,
                                  cfg.max_new_tokens, cfg.temperature, stop)
    return list(zip(prompt_ids, completions, strict=True))


def _lesson_step(model: Any, tokenizer: Any, contexts: dict[str, TeacherContext],
                 picks: Sequence[tuple[Lesson, tuple[dict[str, str], ...]]], cfg: DistillConfig,
                 stop: set[int]) -> tuple[Any, float, int]:
    """One OPSD term: the student samples on every picked prompt in one batch; each sample is
    scored by its own session's teacher."""
    repeat = cfg.samples_per_prompt
    student_prompts = [chat_ids(tokenizer, p, generation=True) for _, p in picks]
    teacher_prompts = [teacher_suffix(tokenizer, contexts[lesson.session_id], lesson.context, p)
                       for lesson, p in picks]
    ys = sample(model, tokenizer, student_prompts, repeat, cfg.max_new_tokens,
                cfg.temperature, stop)
    loss, tokens = distill_loss(
        model, tokenizer,
        [contexts[lesson.session_id] for lesson, _ in picks for _ in range(repeat)],
        [p for p in student_prompts for _ in range(repeat)],
        [p for p in teacher_prompts for _ in range(repeat)], ys, cfg)
    return loss, float(loss.detach()), tokens


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"),
                    TextColumn("loss {task.fields[loss]:.4f}"),
                    TextColumn("kl {task.fields[kl]:.4f}"),
                    TextColumn("{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn(),
                    disable=not enabled)
