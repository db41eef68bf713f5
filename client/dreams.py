"""Dreaming: the teacher, a session in its context, writes the user's next turns, and those
it answers with confidence are kept (`Dream`) as practice prompts for this consolidation and,
through the replay buffer (client/replay.py), for later ones. Kept apart from the loop
(client/distill.py): a step of its own before it, with its own sampling and filter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fleetmind.client import lora
from fleetmind.client.lessons import Lesson
from fleetmind.client.sampling import PromptRead, greedy_confidence, sample
from fleetmind.client.scoring import TeacherContexts
from fleetmind.client.tokens import chat_ids, turn_end_ids, user_turn_prefix_ids


@dataclass(frozen=True)
class Dream:
    """A practice prompt the teacher wrote about a session, kept for replay."""

    session_id: str
    prompt: tuple[dict[str, str], ...]
    confidence: float


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
