"""On-policy self-distillation (OPSD): a site's sessions become a LoRA B delta.

Student: the global model with the site's adapter, no session context.
Teacher: the same weights with the adapter disabled, the scrubbed session in its context.
For prompts x the student samples y at temperature 1 and minimises the per-token reverse
KL to the teacher on its own tokens (docs/design.md "OPSD, the learning core"); the
forgetting guard distils the adapted model toward the frozen model on general inputs that
both see alike.

Read top to bottom: config, prompt and token helpers, sampling, scoring completions (the
teachers' cached contexts among it), the loss, dreaming, then `consolidate`, the loop itself.
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

Messages = list[dict[str, str]]
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
# Lessons dreamt in one pass, their drafts and answers decoded in one batch each
# (docs/real-shapes.md "The system turn read once").
DREAM_LESSONS_PER_PASS = 4
# Prompts whose first tokens agree for at least this many have them read once
# (`common_start`): at the SmolLM2-135M shape a chat template's system turn is 46 tokens of a
# guard prompt's 96; the toy model's prompts share 3, which do not pay for a model call of
# their own (docs/real-shapes.md "The system turn read once").
SHARED_START_MIN = 16
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


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Rows right-aligned in one batch: ids (B, L) and the attention mask of the real ones."""
    import torch

    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, length - len(row):] = 1
    return ids, mask


def model_device(model: Any) -> Any:
    """The device the model's weights are on: where every input must be made."""
    return next(model.parameters()).device


def positions(mask: Any) -> Any:
    """Each real token's position in its own row, from a left-padded batch's mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---- sampling ----------------------------------------------------------------------------

@dataclass
class PromptRead:
    """A batch of prompts, left-padded, read once: the logits that predict each one's first
    completion token (P, 1, V), their KV cache, and the attention mask of their real tokens
    (P, L)."""

    logits: Any
    cache: Any
    mask: Any


def read_prompts(model: Any, prompts: Sequence[Sequence[int]], pad: int,
                 units: Sequence[int] | None = None) -> PromptRead:
    """One pass over the prompts, left-padded; only their last positions reach the vocabulary
    projection. units: each prompt's unit, whose delta its row adds (`lora.UnitDeltas`).

    Prompts that start alike (a chat template's system turn) have their common start read
    once per unit (`read_common_start`), then each prompt's own rest after it, the rests
    left-padded between the two (masked out, positions counted past them), so every prompt
    still ends at the last column."""
    import torch

    device = model_device(model)
    shared = common_start(prompts)
    cache = (kv_cache(model, read_common_start(model, prompts[0][:shared], len(prompts), units))
             if shared else None)
    return read_rests(model, cache,
                      torch.ones((len(prompts), shared), dtype=torch.long, device=device),
                      [shared] * len(prompts), [p[shared:] for p in prompts], pad, units)


def read_rests(model: Any, cache: Any, past_mask: Any, past_lengths: Sequence[int],
               rests: Sequence[Sequence[int]], pad: int,
               units: Sequence[int] | None = None) -> PromptRead:
    """Each row's rest read after its past in `cache` (None: no past), rests left-padded
    between the two: past_mask (P, W) marks the past's real positions, past_lengths counts
    them; units: each row's unit (`lora.UnitDeltas`)."""
    import torch

    device = model_device(model)
    ids, rest_mask = pad_left(rests, pad)  # (P, L)
    ids, rest_mask = ids.to(device), rest_mask.to(device)
    mask = torch.cat([past_mask, rest_mask], 1)
    start = torch.tensor([[n] for n in past_lengths], dtype=torch.long, device=device)
    with lora.routed(model, unit_index(units, device)):
        out = model(input_ids=ids, attention_mask=mask, position_ids=start + positions(rest_mask),
                    cache=cache, use_cache=True, logits_to_keep=1)
    return PromptRead(out.logits, out.cache, mask)


def common_start(prompts: Sequence[Sequence[int]]) -> int:
    """How many first tokens every prompt shares, when they are worth a read of their own
    (at least SHARED_START_MIN), each prompt keeping a token of its own; else 0."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts)
    columns = zip(*prompts, strict=False)  # as far as the shortest goes
    common = next((i for i, column in enumerate(columns) if len(set(column)) > 1), shortest)
    shared = min(common, shortest - 1)
    return shared if shared >= SHARED_START_MIN else 0


def read_common_start(model: Any, start: Sequence[int], rows: int,
                      units: Sequence[int] | None = None) -> list[tuple[Any, Any]]:
    """Per layer (keys, values), (rows, heads, len(start), head_dim): `start` read once for
    each unit among `units` (each row's; None: one read without units), copied to its rows.
    A unit's delta changes what the start reads as, so units never share a read."""
    import torch

    device = model_device(model)
    distinct = sorted(set(units)) if units is not None else []
    with lora.routed(model, unit_index(distinct or None, device)):
        out = model(input_ids=torch.tensor([list(start)] * max(len(distinct), 1), device=device),
                    use_cache=True, logits_to_keep=1)
    pick = torch.tensor([distinct.index(u) for u in units] if units is not None else [0] * rows,
                        dtype=torch.long, device=device)
    return [(layer.keys.index_select(0, pick), layer.values.index_select(0, pick))
            for layer in out.cache.layers]


def unit_index(units: Sequence[int] | None, device: Any) -> Any:
    """Each row's unit as `lora.routed` takes it, (rows, 1); None for none."""
    import torch

    if units is None:
        return None
    return torch.tensor(list(units), dtype=torch.long, device=device)[:, None]


def uniform(rows: Any, generators: Sequence[Any] | None, device: Any) -> Any:
    """One uniform draw per row, (len(rows), 1): from each row's unit's own generator
    (`rows` holds each row's unit), so a unit samples the same whichever units share its
    pass; the global generator when there are none."""
    import torch

    if generators is None:
        return torch.rand(len(rows), 1, device=device)
    draw = torch.empty(len(rows), 1, device=device)
    for unit, generator in enumerate(generators):
        mine = (rows == unit).nonzero()[:, 0]
        if len(mine):
            draw[mine] = torch.rand(len(mine), 1, device=device, generator=generator)
    return draw


def kv_cache(model: Any, layers: Sequence[tuple[Any, Any]]) -> Any:
    """A KV cache made of the given per-layer (keys, values), each (B, heads, L, head_dim),
    without copying them; the cache's own updates replace its tensors, never change these."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers), config=model.config)


def sample(model: Any, tokenizer: Any, prompts: Sequence[list[int]], samples: int,
           max_new_tokens: int, temperature: float, stop_ids: set[int],
           generator: Any = None, read: PromptRead | None = None,
           step_log_probs: list[tuple[Any, Any]] | None = None) -> list[list[int]]:
    """`samples` completions per prompt from `model` as it is now (adapter on or off), each cut
    after its first stop token, prompt by prompt; drawn from `generator` (None: torch's).
    read, step_log_probs: as `generate` takes them."""
    completions, _ = generate(model, tokenizer, prompts, samples, max_new_tokens, temperature,
                              stop_ids, read=read,
                              generators=None if generator is None else [generator],
                              step_log_probs=step_log_probs)
    return completions


def row_log_probs(steps: Sequence[tuple[Any, Any]], lengths: Sequence[int],
                  skip_first: int) -> list[Any]:
    """Each row's log-probabilities at its own tokens after the first `skip_first`,
    (length - skip_first, V), from `generate`'s step_log_probs (row r has `lengths[r]`)."""
    import torch

    out = []
    for row, length in enumerate(lengths):
        picked = [log_probs[(live == row).nonzero()[0, 0]]
                  for live, log_probs in steps[skip_first:length]]
        out.append(torch.stack(picked) if picked else steps[0][1][:0])
    return out


def greedy_confidence(model: Any, tokenizer: Any, prompts: Sequence[list[int]],
                      max_new_tokens: int, stop_ids: set[int],
                      read: PromptRead | None = None) -> list[float]:
    """Mean probability of each greedy answer's tokens: how sure the model is of it.
    read: the prompts already read (`generate`)."""
    _, confidences = generate(model, tokenizer, prompts, 1, max_new_tokens, 0.0, stop_ids,
                              read=read)
    return confidences


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], samples: int,
             max_new_tokens: int, temperature: float, stop_ids: set[int],
             read: PromptRead | None = None, units: Sequence[int] | None = None,
             generators: Sequence[Any] | None = None,
             step_log_probs: list[tuple[Any, Any]] | None = None
             ) -> tuple[list[list[int]], list[float]]:
    """A plain KV-cached decoding loop: `samples` continuations of each prompt, sampled at
    `temperature` or greedy when it is 0. Each prompt is read once and its cache copied to its
    samples (the prompts left-padded in one batch); a row leaves the batch at its first stop
    token. Returns the completions, prompt by prompt, each ending at its first stop token,
    and the mean probability of each one's tokens.

    read: `prompts` as `read_prompts` already read them with the model as it is now (the
    student's pass of a step, whose graph the loss reuses); decoding continues from a
    detached copy of it, which leaves it as it was. None: they are read here.
    units: each prompt's unit (`lora.UnitDeltas`), None for none; generators: one per unit
    (a single one without units), each unit's rows drawn from its own (`uniform`).
    step_log_probs: when given, each step's (the rows still decoding, the log-probabilities
    their next token was drawn from at temperature 1, (live, V)) is appended to it
    (`row_log_probs` gives each row's)."""
    import torch

    device = model_device(model)
    stops = torch.tensor(sorted(stop_ids), device=device)
    rows = len(prompts) * samples
    row_units = (torch.zeros(rows, dtype=torch.long, device=device) if units is None else
                 unit_index(units, device)[:, 0].repeat_interleave(samples))
    tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.long, device=device)
    token_probs = torch.zeros((rows, max_new_tokens), device=device)
    live = torch.arange(rows, device=device)  # the rows still decoding
    with torch.inference_mode():
        if read is None:
            read = read_prompts(model, prompts, tokenizer.pad_token_id, units)
        cache = kv_cache(model, [(layer.keys.detach(), layer.values.detach())
                                 for layer in read.cache.layers])
        cache.batch_repeat_interleave(samples)
        logits = read.logits[:, -1].detach().float().repeat_interleave(samples, dim=0)  # (B, V)
        mask = read.mask.repeat_interleave(samples, dim=0)  # (B, L)
        position = mask.sum(-1, keepdim=True) - 1  # (B, 1): each prompt's last position
        for step in range(max_new_tokens):
            p = torch.softmax(logits, dim=-1)  # (live, V)
            if step_log_probs is not None:
                step_log_probs.append((live, torch.log_softmax(logits, dim=-1)))
            if temperature > 0:
                # Inverse-CDF sampling: torch.multinomial's distribution, much faster (timings:
                # docs/measurements.md "Consolidation (OPSD)"). The uniform draw is scaled to
                # the CDF's total, and right=True picks the first entry above it: never a
                # token of probability zero.
                cdf = (p if temperature == 1 else torch.softmax(logits / temperature, dim=-1)
                       ).cumsum(-1)
                draw = uniform(row_units[live], generators, device) * cdf[:, -1:]
                token = torch.searchsorted(cdf, draw, right=True)[:, 0]
            else:
                token = p.argmax(-1)
            tokens[live, step] = token
            token_probs[live, step] = p.gather(-1, token[:, None])[:, 0]
            going = ~torch.isin(token, stops)
            if step == max_new_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):
                # Finished rows leave the batch: the others' decoding steps stop paying for them.
                kept = going.nonzero()[:, 0]
                live, token, mask, position = live[kept], token[kept], mask[kept], position[kept]
                cache.batch_select_indices(kept)
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long,
                                               device=device)], dim=1)
            position = position + 1
            with lora.routed(model, None if units is None else row_units[live][:, None]):
                out = model(input_ids=token[:, None], attention_mask=mask,
                            position_ids=position, cache=cache, use_cache=True,
                            logits_to_keep=1)
            logits = out.logits[:, -1].float()
    completions, confidences = [], []
    for row, chosen in zip(tokens.tolist(), token_probs.cpu(), strict=True):
        length = next((j for j, t in enumerate(row) if t < 0), len(row))
        completions.append(row[:length])
        confidences.append(float(chosen[:length].mean()))
    return completions, confidences


# ---- scoring completions -------------------------------------------------------------------

def completion_logits(model: Any, prompts: Sequence[Sequence[int]],
                      completions: Sequence[Sequence[int]], skip_first: int,
                      owners: Sequence[int] | None = None, read: PromptRead | None = None,
                      units: Sequence[int] | None = None) -> tuple[Any, list[int]]:
    """The logits that predict each completion's tokens, the first `skip_first` of each left
    out, all rows' concatenated: (N', V), and how many each row has. Completion j continues
    prompt owners[j] (None: prompt j); all go through one packed pass (`packed_logits`).

    read: the prompts as `read_prompts` read them (the student's pass of a step, which its
    sampling used; `prompts` is then not needed): the completions continue its cache.
    None: the prompts' common start, if any (`common_start`), is read once per unit and
    each prompt's rest packed after it.
    units: each prompt's unit (`lora.UnitDeltas`); a completion is its prompt's, and each
    unit's rows are packed in a row of their own."""
    import torch

    owners = range(len(completions)) if owners is None else owners
    routed = units is not None
    if read is None:
        shared = common_start(prompts)
        past = None if not shared else (
            read_common_start(model, prompts[0][:shared], len(prompts), units),
            torch.ones((len(prompts), shared), dtype=torch.long, device=model_device(model)))
        return packed_logits(model, past, [p[shared:] for p in prompts], completions, owners,
                             skip_first, rows=units, routed=routed)
    return packed_logits(model, ([(layer.keys, layer.values) for layer in read.cache.layers],
                                 read.mask),
                         [[] for _ in range(len(read.mask))], completions, owners, skip_first,
                         read.logits[:, -1], units, routed)


def packed_logits(model: Any, past: tuple[Sequence[tuple[Any, Any]], Any] | None,
                  suffixes: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  owners: Sequence[int], skip_first: int, past_logits: Any = None,
                  rows: Sequence[int] | None = None, routed: bool = False
                  ) -> tuple[Any, list[int]]:
    """`completion_logits` in one forward pass over packed rows.

    Completion j continues suffix owners[j]; suffix i continues row i of `past` (keys and
    values per layer, each (P, heads, W, head_dim), and the mask of their real positions
    (P, W), a row per suffix), or reads alone when there is no past. A packed row holds its
    suffixes, then their completions but each one's last token; a 4D mask lets each token see
    its own past row's real positions, its own suffix, and its own piece up to itself, so no
    position is padding (on the toy model a step's 16 samples are 96 positions where
    right-padded rows were 176), and only the positions that predict a completion token
    reach the vocabulary projection.
    rows: the packed row of each suffix (its completions go with it), None for one row.
    Each unit's rows in a row of their own keep attention's cost linear in the units (one
    row of everything is quadratic). routed: row r adds unit r's delta (`lora.UnitDeltas`).
    A completion whose suffix is empty takes its first token's logits from `past_logits`
    (P, V), its past row's last logits."""
    import torch

    device = model_device(model)
    row_of = [0] * len(suffixes) if rows is None else list(rows)
    members = [[i for i, r in enumerate(row_of) if r == row] for row in range(max(row_of) + 1)]
    past_mask = None if past is None else past[1].cpu()  # index arithmetic runs on the CPU
    packs = [_pack_row([suffixes[i] for i in member],
                       [(j, member.index(owner)) for j, owner in enumerate(owners)
                        if row_of[owner] == row],
                       completions, None if past_mask is None else past_mask[member])
             for row, member in enumerate(members)]
    width = max(len(pack.ids) for pack in packs)
    slots = max(len(member) for member in members)  # past rows per packed row
    past_width = 0 if past_mask is None else slots * past_mask.shape[1]
    ids = torch.zeros((len(packs), width), dtype=torch.long)
    position = torch.zeros((len(packs), width), dtype=torch.long)
    mask = torch.zeros((len(packs), width, past_width + width), dtype=torch.bool)
    mask[:, range(width), [past_width + t for t in range(width)]] = True  # padding sees itself
    for row, pack in enumerate(packs):
        n = len(pack.ids)
        ids[row, :n], position[row, :n] = pack.ids, pack.position
        mask[row, :n, past_width:past_width + n] = pack.own
        if pack.seen is not None:
            mask[row, :n, :pack.seen.shape[1]] = pack.seen
    cache = None
    if past is not None:
        def row_of_past(tensor: Any, member: list[int]) -> Any:
            """(P, heads, W, head_dim) -> (heads, slots * W, head_dim): the row's past rows."""
            picked = tensor[member]
            padded = torch.nn.functional.pad(picked, (0, 0, 0, 0, 0, 0, 0, slots - len(member)))
            return padded.transpose(0, 1).flatten(1, 2)

        cache = kv_cache(model, [
            (torch.stack([row_of_past(keys, member) for member in members]),
             torch.stack([row_of_past(values, member) for member in members]))
            for keys, values in past[0]])
    wanted = [pack.wanted(skip_first) for pack in packs]
    keep = sorted({w for row in wanted for _, w in row if w >= 0})
    if keep:
        route = torch.arange(len(packs), device=device)[:, None] if routed else None
        with lora.routed(model, route):
            logits = model(input_ids=ids.to(device), attention_mask=mask[:, None].to(device),
                           position_ids=position.to(device), cache=cache,
                           use_cache=cache is not None,
                           logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device)
                           ).logits.flatten(0, 1)  # (rows * K, V)
    else:  # every wanted logit is a past row's own (one-token samples): no pass at all
        logits = torch.zeros((0, model.config.vocab_size), device=device)
    table = logits if past_logits is None else torch.cat([logits, past_logits])
    slot = {w: i for i, w in enumerate(keep)}
    found = {}
    for row, (row_wanted, member) in enumerate(zip(wanted, members, strict=True)):
        for (j, k), w in row_wanted:
            found[j, k] = (row * len(keep) + slot[w] if w >= 0
                           else len(logits) + member[-1 - w])
    index = torch.tensor([found[j, k] for j, y in enumerate(completions)
                          for k in range(skip_first, len(y))], dtype=torch.long)
    return (table.index_select(0, index.to(device)),
            [max(len(y) - skip_first, 0) for y in completions])


@dataclass
class _PackedRow:
    """One packed row's tokens, positions and mask (`packed_logits`): `own` (T, T) over the
    row's tokens, `seen` (T, P * W) over its past rows' positions; completion (j, its suffix's
    index in the row) for each of the row's completions."""

    ids: Any
    position: Any
    own: Any
    seen: Any
    completions: list[tuple[int, int]]
    starts: list[int]
    lengths: list[int]
    suffix_count: int
    completion_lengths: dict[int, int]

    def wanted(self, skip_first: int) -> list[tuple[tuple[int, int], int]]:
        """(completion j, token k) and where the logit that predicts it is: a position in the
        row, or -1 - p for the row's past row p's last logit."""
        out = []
        for piece, (j, owner) in enumerate(self.completions, start=self.suffix_count):
            for k in range(skip_first, self.completion_lengths[j]):
                if k > 0:
                    where = self.starts[piece] + k - 1  # after the completion's token k-1
                elif self.lengths[owner]:
                    where = self.starts[owner] + self.lengths[owner] - 1  # its suffix's last
                else:
                    where = -1 - owner
                out.append(((j, k), where))
        return out


def _pack_row(suffixes: Sequence[Sequence[int]], completions: Sequence[tuple[int, int]],
              every_completion: Sequence[Sequence[int]], past_mask: Any) -> _PackedRow:
    """A packed row of `suffixes` and `completions` ((j, the index of its suffix among
    `suffixes`)), the completions' tokens from `every_completion`; `past_mask` (P, W): the
    real positions of each suffix's past row, or None."""
    import torch

    pieces = [list(x) for x in suffixes] + [list(every_completion[j][:-1])
                                            for j, _ in completions]
    lengths = torch.tensor([len(x) for x in pieces], dtype=torch.long)
    starts = lengths.cumsum(0) - lengths
    piece = torch.repeat_interleave(torch.arange(len(pieces)), lengths)  # (T,) each token's
    step = torch.arange(len(piece)) - starts[piece]  # and its index in it
    is_rest = piece >= len(suffixes)
    owner = torch.tensor([o for _, o in completions] or [0], dtype=torch.long)
    suffix = torch.where(is_rest, owner[(piece - len(suffixes)).clamp(min=0)], piece)
    own = ((piece[:, None] == piece[None, :]) & (step[:, None] >= step[None, :])
           | is_rest[:, None] & (suffix[:, None] == piece[None, :]))  # (T, T)
    position = torch.where(is_rest, lengths[suffix], 0) + step  # (T,)
    seen = None
    if past_mask is not None:
        position = position + past_mask.sum(-1)[suffix]
        seen = torch.zeros((len(piece), len(past_mask), past_mask.shape[1]), dtype=torch.bool)
        seen[torch.arange(len(piece)), suffix] = past_mask.bool().index_select(0, suffix)
        seen = seen.flatten(1)
    return _PackedRow(torch.tensor([t for x in pieces for t in x], dtype=torch.long), position,
                      own, seen, list(completions), starts.tolist(), lengths.tolist(),
                      len(suffixes), {j: len(every_completion[j]) for j, _ in completions})


@dataclass
class TeacherContexts:
    """Every session's context as the frozen model read it, encoded once per consolidation
    and its KV cache reused, unchanged, for every sample; the caches are held left-padded to
    the longest, per layer keys and values (S, heads, P, head_dim), with the mask (S, P) of
    real positions, so that one pass serves rows of different sessions."""

    ids: dict[str, list[int]]
    row: dict[str, int]
    layers: list[tuple[Any, Any]]
    mask: Any

    @classmethod
    def encode(cls, model: Any, contexts: dict[str, list[int]]) -> TeacherContexts:
        """Each session alone (batch 1, no padding), so encoding never holds more than one
        session's activations; their common start (the system turn), if any, read once."""
        import torch
        import torch.nn.functional as F

        caches = []
        device = model_device(model)
        every = list(contexts.values())
        shared = common_start(every)
        with torch.no_grad(), lora.frozen_global(model):
            start = read_common_start(model, every[0][:shared], 1) if shared else None
            for ids in every:
                out = model(input_ids=torch.tensor([ids[shared:]], device=device),
                            position_ids=torch.arange(shared, len(ids), device=device)[None],
                            cache=None if start is None else kv_cache(model, start),
                            use_cache=True, logits_to_keep=1)
                caches.append([(layer.keys, layer.values) for layer in out.cache.layers])
        width = max(len(ids) for ids in contexts.values())

        def padded(tensor: Any) -> Any:  # (1, heads, n, head_dim) -> (1, heads, width, ...)
            return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))

        layers = [(torch.cat([padded(cache[i][0]) for cache in caches]),
                   torch.cat([padded(cache[i][1]) for cache in caches]))
                  for i in range(len(caches[0]))]
        _, mask = pad_left(list(contexts.values()), 0)
        mask = mask.to(device)
        return cls(dict(contexts), {session: i for i, session in enumerate(contexts)}, layers,
                   mask)

    def read_after(self, model: Any, sessions: Sequence[str], prompts: Sequence[Sequence[int]],
                   pad: int) -> PromptRead | None:
        """`read_prompts` for prompts that continue their sessions' contexts (lessons' dreams;
        prompt i continues sessions[i]): the held caches stand for the contexts, so only each
        prompt's rest is read, rests left-padded after them. None when a prompt does not
        start with its context's tokens (a chat template may write a turn differently once
        another follows). The frozen model reads, as it read the contexts."""
        import torch

        contexts = [self.ids[session] for session in sessions]
        if not prompts or any(list(p[:len(c)]) != c or len(p) <= len(c)
                              for p, c in zip(prompts, contexts, strict=True)):
            return None
        index = torch.tensor([self.row[session] for session in sessions], dtype=torch.long,
                             device=self.mask.device)
        cache = kv_cache(model, [(k.index_select(0, index), v.index_select(0, index))
                                 for k, v in self.layers])
        with torch.no_grad(), lora.frozen_global(model):
            return read_rests(model, cache, self.mask.index_select(0, index),
                              [len(c) for c in contexts],
                              [p[len(c):] for p, c in zip(prompts, contexts, strict=True)], pad)

    def log_probs(self, model: Any, sessions: Sequence[str], suffixes: Sequence[Sequence[int]],
                  completions: Sequence[Sequence[int]], owners: Sequence[int],
                  skip_first: int, rows: Sequence[int] | None = None) -> tuple[Any, list[int]]:
        """The frozen model's log-probabilities on each completion, read after its prompt:
        prompt i is session i's context then suffix i, and completion j continues prompt
        owners[j], the first `skip_first` tokens of each left out (`completion_logits`). The
        suffixes and completions go through in one packed pass after the held caches, which
        never change; rows: each prompt's packed row (`packed_logits`)."""
        import torch

        index = torch.tensor([self.row[s] for s in sessions], dtype=torch.long,
                             device=self.mask.device)
        layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers]
        with torch.no_grad(), lora.frozen_global(model):
            logits, counts = packed_logits(model, (layers, self.mask.index_select(0, index)),
                                           suffixes, completions, owners, skip_first,
                                           rows=rows)
        return torch.log_softmax(logits.float(), dim=-1), counts


def teacher_suffix(tokenizer: Any, context_ids: list[int], lesson_context: Sequence[dict],
                   prompt: Sequence[dict[str, str]]) -> list[int]:
    full = chat_ids(tokenizer, [*lesson_context, *prompt], generation=True)
    if full[: len(context_ids)] != context_ids:
        raise ValueError("the chat template does not render the session as a prefix of the "
                         "session plus a prompt; KV-cache reuse needs that")
    return full[len(context_ids):]


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


@dataclass(frozen=True)
class LessonPrompt:
    """A prompt to learn from, tokenized once per consolidation: what the student reads, and
    what its session's teacher reads after the session's cached context."""

    session_id: str
    student: list[int]
    teacher_suffix: list[int]

    @classmethod
    def encode(cls, tokenizer: Any, contexts: TeacherContexts, lesson: Lesson,
               prompt: Sequence[dict[str, str]]) -> LessonPrompt:
        return cls(lesson.session_id, chat_ids(tokenizer, prompt, generation=True),
                   teacher_suffix(tokenizer, contexts.ids[lesson.session_id], lesson.context,
                                  prompt))


@dataclass(frozen=True)
class LessonBatch:
    """One step's on-policy rows: the step's prompts, and the student's sampled completions,
    each with the index of the prompt it continues; `student_read`: the student's pass over
    the prompts that the samples continued, with its graph, which the loss reuses (None: the
    loss reads the prompts itself); `units`: each prompt's unit when several units share the
    step (`lora.UnitDeltas`), None for one unit trained on the adapter itself."""

    prompts: list[LessonPrompt]
    owners: list[int]
    completions: list[list[int]]
    student_read: PromptRead | None = None
    units: list[int] | None = None

    @property
    def unit_count(self) -> int:
        return 1 if self.units is None else max(self.units) + 1

    def row_units(self) -> list[int]:
        """Each completion's unit."""
        return [0 if self.units is None else self.units[o] for o in self.owners]

    def distilled_tokens(self, skip_first: int, unit: int = 0) -> int:
        """The student's sampled tokens of `unit` that enter the loss."""
        return sum(max(len(y) - skip_first, 0) for y, owner in
                   zip(self.completions, self.row_units(), strict=True) if owner == unit)


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


# ---- dreaming ------------------------------------------------------------------------------

def dream(model: Any, tokenizer: Any, lessons: Sequence[Lesson], count: int,
          max_new_tokens: int, threshold: float, scrub: Callable[[str], str] | None = None,
          generator: Any = None, contexts: TeacherContexts | None = None
          ) -> list[tuple[list[Dream], int]]:
    """The teacher, each lesson's session in context, writes the user's next turn `count`
    times (drawn from `generator`, None: torch's): the lessons' drafts in one batch, then
    their answers in another. Duplicates, prompts already in the session, and prompts whose
    greedy answer the teacher gives with mean token probability below `threshold` are
    dropped. Returns (kept, rejected) for each lesson. contexts: the consolidation's held
    session caches, which the drafts and their answers continue instead of reading the
    sessions again (`TeacherContexts.read_after`)."""

    def read(prompts: list[list[int]], owners: Sequence[int]) -> PromptRead | None:
        return (None if contexts is None else contexts.read_after(
            model, [lessons[i].session_id for i in owners], prompts, tokenizer.pad_token_id))

    user_end = turn_end_ids(tokenizer, model)
    prefixes = [user_turn_prefix_ids(tokenizer, lesson.context) for lesson in lessons]
    with lora.frozen_global(model):
        drafts = sample(model, tokenizer, prefixes, count, max_new_tokens, 1.0, user_end,
                        generator, read(prefixes, range(len(lessons))))
    candidates: list[tuple[int, tuple[dict[str, str], ...]]] = []
    for i, lesson in enumerate(lessons):
        seen = {p[0]["content"] for p in lesson.probes}
        for draft in drafts[i * count:(i + 1) * count]:
            text = tokenizer.decode([t for t in draft if t not in user_end],
                                    skip_special_tokens=True).strip()
            text = scrub(text) if scrub else text
            if text and text not in seen:
                seen.add(text)
                candidates.append((i, ({"role": "user", "content": text},)))
    confidences: list[float] = []
    if candidates:
        prompts = [chat_ids(tokenizer, [*lessons[i].context, *p], generation=True)
                   for i, p in candidates]
        with lora.frozen_global(model):
            confidences = greedy_confidence(model, tokenizer, prompts, max_new_tokens, user_end,
                                            read(prompts, [i for i, _ in candidates]))
    kept: list[list[Dream]] = [[] for _ in lessons]
    for (i, prompt), confidence in zip(candidates, confidences, strict=True):
        if confidence >= threshold:
            kept[i].append(Dream(lessons[i].session_id, prompt, confidence))
    return [(mine, count - len(mine)) for mine in kept]


def turn_end_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """The tokens that end a turn, where sampling stops: the tokenizer's end of sequence,
    every `eos_token_id` of the model's generation config (Llama 3's <|eot_id|>, Gemma's
    <end_of_turn>, Qwen's <|im_end|> list themselves there), and the special token the
    chat template writes right after a message (`template_turn_end`), for model folders
    without a generation config."""
    ends = {tokenizer.eos_token_id, template_turn_end(tokenizer)}
    config = getattr(model, "generation_config", None) if model is not None else None
    listed = getattr(config, "eos_token_id", None)
    ends.update(listed if isinstance(listed, list | tuple) else [listed])
    return {t for t in ends if isinstance(t, int)}


def template_turn_end(tokenizer: Any) -> int | None:
    """The special token the chat template writes after an assistant message's content
    (ChatML's <|im_end|>, Phi-3's <|end|>, Gemma's <end_of_turn>), or None when what follows
    the content is not one special token."""
    from jinja2 import TemplateError

    marker = "\u2063fleetmind-turn\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except (TemplateError, ValueError, TypeError):  # no template, or one that cannot render
        return None  # a user-assistant exchange: it names no turn end
    if marker not in text:
        return None
    after = text[text.index(marker) + len(marker):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


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
