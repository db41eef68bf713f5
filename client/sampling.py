"""Reading prompts and decoding after them: the KV-cached loop that draws the student's
samples, the guard's completions and the teacher's dreams, and the prompt reads it starts
from (a common start read once per unit, each prompt's rest after it). Kept apart from the
distillation (client/distill.py) because decoding is the same whoever calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetmind.client import lora
from fleetmind.client.tokens import model_device, pad_left, positions

# Prompts whose first tokens agree for at least this many have them read once
# (`common_start`): at the SmolLM2-135M shape a chat template's system turn is 46 tokens of a
# guard prompt's 96; the toy model's prompts share 3, which do not pay for a model call of
# their own (docs/real-shapes.md "The system turn read once").
SHARED_START_MIN = 16


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
