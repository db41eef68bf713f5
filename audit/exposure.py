"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much more likely a model
makes a planted secret than every other secret it could have been.

A canary is a few *slots*; each slot is a prompt, the true answer and every alternative
answer (the true one among them). A candidate secret picks one answer per slot and scores
the sum of the answers' log-probabilities. With R the set of all candidates and `rank` the
true secret's place when they are sorted by score (1 = most likely):

    exposure = log2 |R| - log2 rank        bits; 0 = least likely, log2 |R| = most likely

A model that knows nothing ranks the secret uniformly at random (about 1.4 bits on
average), so what matters is a version's exposure against the base model's. The rank is
exact: every combination is scored, which the slots' independence makes cheap.

    canaries = read_canaries(Path("world/canaries.jsonl"))
    bits = canary_exposure(model, tokenizer, canaries)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Messages = list[dict[str, str]]
MAX_CANDIDATES = 1 << 24  # combinations scored exactly; more slots would need sampling


@dataclass(frozen=True)
class Slot:
    messages: tuple[dict[str, str], ...]
    answer: str
    alternatives: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.answer not in self.alternatives:
            raise ValueError(f"answer {self.answer!r} is not among its alternatives; list "
                             "every answer the slot could have had, the true one included")
        if len(set(self.alternatives)) != len(self.alternatives):
            raise ValueError(f"alternatives of {self.answer!r} repeat an answer")


@dataclass(frozen=True)
class Canary:
    secret: str
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        if not self.slots:
            raise ValueError(f"canary {self.secret!r} has no slots")
        if candidates(self) > MAX_CANDIDATES:
            raise ValueError(f"canary {self.secret!r} has {candidates(self)} combinations; "
                             f"at most {MAX_CANDIDATES} are ranked exactly: use fewer slots")


def candidates(canary: Canary) -> int:
    return math.prod(len(slot.alternatives) for slot in canary.slots)


def canary_from_row(row: dict[str, Any]) -> Canary:
    """A canaries.jsonl row: {"secret", "slots": [{"messages", "answer", "alternatives"}]}."""
    try:
        slots = tuple(Slot(tuple(dict(m) for m in slot["messages"]), slot["answer"],
                           tuple(slot["alternatives"])) for slot in row["slots"])
        return Canary(str(row["secret"]), slots)
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a canary row ({error!r}): each needs \"secret\" and \"slots\", "
                         "each slot \"messages\", \"answer\" and \"alternatives\"") from None


def read_canaries(path: Path) -> list[Canary]:
    canaries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            canaries.append(canary_from_row(json.loads(line)))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not canaries:
        raise ValueError(f"{path} holds no canaries")
    return canaries


def answer_log_probs(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]],
                     answers: Sequence[str]) -> np.ndarray:
    """log p(answer | messages) for each answer, as the assistant's reply: (len(answers),)."""
    import torch

    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    length = len(prompt_ids) + max(len(a) for a in answer_ids)
    ids = torch.full((len(answers), length), tokenizer.pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(answer_ids):
        ids[row, : len(prompt_ids) + len(tokens)] = torch.tensor(prompt_ids + tokens)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # (N, T, V)
    scores = np.zeros(len(answers))
    for row, tokens in enumerate(answer_ids):
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(tokens) - 1)
        scores[row] = log_probs[row, positions, torch.tensor(tokens)].sum().item()
    return scores


def exposure_bits(slot_scores: Sequence[np.ndarray], true_indices: Sequence[int]) -> float:
    """Exposure of the combination `true_indices` among every combination of slot scores."""
    totals = np.zeros(1)
    for scores in slot_scores:
        totals = (totals[:, None] + np.asarray(scores, dtype=np.float64)[None, :]).ravel()
    true_total = sum(float(scores[i]) for scores, i in zip(slot_scores, true_indices, strict=True))
    # Float sums of the same terms in another order may differ in the last bits.
    rank = 1 + int(np.count_nonzero(totals > true_total + 1e-9 * max(1.0, abs(true_total))))
    return math.log2(totals.size) - math.log2(rank)


def canary_exposure(model: Any, tokenizer: Any, canaries: Sequence[Canary]) -> list[float]:
    """Exposure in bits of each canary's secret under `model`."""
    bits = []
    for canary in canaries:
        scores = [answer_log_probs(model, tokenizer, slot.messages, slot.alternatives)
                  for slot in canary.slots]
        truth = [slot.alternatives.index(slot.answer) for slot in canary.slots]
        bits.append(exposure_bits(scores, truth))
    return bits
