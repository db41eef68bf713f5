"""Scoring completions: the logits that predict each completion's tokens in one packed pass
(the student's on its samples, the frozen model's on the guard's), and the teachers' session
contexts (`TeacherContexts`), read once per consolidation and their caches reused for every
sample. Kept apart from sampling (client/sampling.py) because it reads tokens already chosen
rather than drawing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetmind.client import lora
from fleetmind.client.sampling import (
    PromptRead,
    common_start,
    kv_cache,
    read_common_start,
    read_rests,
)
from fleetmind.client.tokens import chat_ids, model_device, pad_left


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
