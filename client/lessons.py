"""What a consolidation learns from: a scrubbed session as a `Lesson` (the teacher's context,
the session's user turns as prompts), a prompt tokenized once for the student and for its
session's teacher (`LessonPrompt`), and one step's sampled rows (`LessonBatch`). Kept apart
from the loop (client/distill.py) because the loss and the dreams, which it imports, name
them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetmind.client.sampling import PromptRead
from fleetmind.client.scoring import TeacherContexts, teacher_suffix
from fleetmind.client.tokens import chat_ids

Messages = list[dict[str, str]]


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
