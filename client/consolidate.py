"""A site's consolidation: new sessions from the store become an update.

store -> scrub -> lessons (teacher context + probes) -> OPSD with dreams, replay and the
forgetting guard -> the delta of B (one for all sessions, or one per session for
session- or user-level DP) -> an `Update` and, for local use, a PEFT adapter folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetmind.aggregation.manifest import DEFAULT_ALPHA, DEFAULT_RANK
from fleetmind.aggregation.update import Update, UpdateMetadata
from fleetmind.client import distill, lora
from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.dreams import Dream
from fleetmind.client.guard import guard_examples
from fleetmind.client.lessons import Lesson, Messages
from fleetmind.client.replay import ReplayBuffer
from fleetmind.client.scrub import ScrubReport, scrub_session, scrub_text
from fleetmind.client.store import Session, SessionStore
from fleetmind.client.tokens import chat_ids, turn_end_ids
from fleetmind.runtime.durable import atomic_write

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SiteConsolidation:
    update: Update
    session_updates: tuple[tuple[str, dict[str, np.ndarray]], ...]
    scrubbed: ScrubReport
    stats: distill.DistillStats
    consolidation_id: str


def lessons_from(sessions: Sequence[Session]) -> tuple[list[Lesson], ScrubReport]:
    """The teacher only ever sees scrubbed text."""
    lessons, reports = [], []
    for session in sessions:
        clean, report = scrub_session(session)
        reports.append(report)
        lessons.append(Lesson.from_session(
            clean.id, [{"role": m.role, "content": m.content} for m in clean.messages]))
    return lessons, ScrubReport.merge(reports)


def fit_lessons(model: Any, tokenizer: Any, lessons: Sequence[Lesson],
                cfg: DistillConfig) -> tuple[list[Lesson], int]:
    """Each lesson's context cut to the model's context length by `model.fit_to_context`'s
    rule (oldest whole turns first), leaving room for a prompt after it (the session's
    longest user turn, or a dream of up to max_new_tokens) and a completion of
    max_new_tokens. Returns the lessons and how many turns were dropped, which the caller
    logs and records: a session is never cut silently."""
    from fleetmind.client.model import context_length, fit_to_context

    window = context_length(model.config)

    def count(messages: Sequence[dict[str, str]]) -> int:
        return len(chat_ids(tokenizer, messages, generation=False))

    fitted, dropped = [], 0
    for lesson in lessons:
        longest = max(len(chat_ids(tokenizer, p, generation=True)) for p in lesson.probes)
        room = window - max(longest, cfg.max_new_tokens) - cfg.max_new_tokens
        try:
            kept, cut = fit_to_context(lesson.context, count, room)
        except ValueError as error:
            raise ValueError(f"session {lesson.session_id}: {error}") from None
        if cut:
            log.warning("session %s: its %d oldest turns do not fit the model's %d-token "
                        "context and are left out of this consolidation", lesson.session_id,
                        cut, window)
            lesson = Lesson.from_session(lesson.session_id, kept)
        fitted.append(lesson)
        dropped += cut
    return fitted, dropped


def read_prompts(path: Path) -> list[Messages]:
    """Chat prompts, one JSON object with `messages` per line (the guard file's format)."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str)
                    and m.get("role") in ("system", "user", "assistant") for m in messages)):
                raise ValueError("messages must be a non-empty list of chat turns")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a chat prompt ({error}); each line must be "
                             '{"messages": [{"role": ..., "content": ...}, ...]}') from None
        prompts.append(messages)
    return prompts


def guard_prompts_from(lessons: Sequence[Lesson]) -> list[Messages]:
    """General inputs for the forgetting guard: each session up to each later user turn, a
    task that carries its own context (reading context is the skill most at risk)."""
    prompts = []
    for lesson in lessons:
        for end, message in enumerate(lesson.context):
            if message["role"] == "user" and end > 0:
                prompts.append([dict(m) for m in lesson.context[: end + 1]])
    return prompts


def consolidate_sessions(model: Any, tokenizer: Any, sessions: Sequence[Session],
                         cfg: DistillConfig, *, site: str, base_version: int,
                         seed: int, guard: Sequence[Messages] = (),
                         replay: ReplayBuffer | None = None,
                         earlier: Callable[[str], Session] | None = None,
                         per_session: bool = False, progress: bool = True) -> SiteConsolidation:
    """OPSD over `sessions` on the PEFT `model` (from `lora.attach_lora`). With `per_session`
    every session is distilled alone from the same starting B, so the aggregation library
    can clip each session's influence, or each end user's (session- or user-level DP); the
    update is then their mean.

    `replay` holds dreams of earlier consolidations and `earlier` finds their sessions by id
    (`SessionStore.get`): the teacher needs a dream's session in its context. Replay is off
    with `per_session`: a dream of session S' rehearsed inside session S's delta would make
    S's privacy unit two sessions."""
    lessons, scrubbed = lessons_from(sessions)
    lessons, turns_dropped = fit_lessons(model, tokenizer, lessons, cfg)
    guard_prompts = list(guard) or guard_prompts_from(lessons)
    rng = random.Random(cfg.seed)
    replayed = []
    if replay is not None and cfg.replay_ratio > 0 and not per_session:
        replayed = _replayed(replay.sample(4 * cfg.prompts_per_step, rng), lessons, earlier)
    start = lora.get_b(model)
    lora.hold_global(model)
    groups = [[lesson] for lesson in lessons] if per_session else [lessons]
    session_updates: list[tuple[str, dict[str, np.ndarray]]] = []
    total = {name: np.zeros_like(b) for name, b in start.items()}
    stats = distill.DistillStats(turns_dropped=turns_dropped)
    dreams: list[Dream] = []
    # Every session starts from the same frozen model, so the guard's examples are the
    # same for all of them: sampled once here, not once per session.
    guard_set = None
    if per_session and cfg.method == "opsd" and cfg.guard_weight > 0 and len(groups) > 1:
        guard_set, _ = guard_examples(model, tokenizer, guard_prompts, cfg,
                                      random.Random(cfg.seed),
                                      turn_end_ids(tokenizer, model))
    for chunk in _passes(groups, cfg):
        lora.set_b(model, start)
        if cfg.method == "sft_transcript":
            results = distill.supervise_units(
                model, tokenizer, [distill.transcript_examples(tokenizer, group)
                                   for group in chunk], cfg)
        else:
            results = distill.consolidate_units(model, tokenizer, chunk, guard_prompts, cfg,
                                                replay=replayed,
                                                scrub=lambda t: scrub_text(t)[0],
                                                progress=progress, guard_set=guard_set)
        for group, result in zip(chunk, results, strict=True):
            for name, delta in result.delta.items():
                total[name] += delta
            if per_session:
                session_updates.append((group[0].session_id, result.delta))
            dreams += result.dreams
            stats.add(result.stats)
    if per_session:
        # DP-FedAvg over sessions: the site's update is the mean of its units' deltas (the
        # aggregation library clips each unit before this mean when DP is on).
        total = {name: delta / len(groups) for name, delta in total.items()}
    lora.set_b(model, {name: start[name] + total[name] for name in start})
    if replay is not None:
        replay.add(dreams)
    metadata = UpdateMetadata(site=site, base_version=base_version, sessions=len(sessions),
                              tokens=stats.tokens, seed=seed)
    ids = sorted(session.id for session in sessions)
    consolidation_id = hashlib.sha256(json.dumps([site, base_version, ids]).encode()).hexdigest()
    return SiteConsolidation(Update(total, metadata), tuple(session_updates), scrubbed, stats,
                             consolidation_id[:16])


def _passes(groups: list[list[Lesson]], cfg: DistillConfig
            ) -> list[list[list[Lesson]]]:
    """The groups, `cfg.units_per_pass` to a pass (`lora.UnitDeltas`)."""
    return [groups[i:i + cfg.units_per_pass]
            for i in range(0, len(groups), cfg.units_per_pass)]


def _replayed(dreams: Sequence[Dream], lessons: Sequence[Lesson],
              earlier: Callable[[str], Session] | None
              ) -> list[tuple[Lesson, Dream]]:
    """Each dream with its session's lesson; dreams whose session is gone are dropped."""
    known = {lesson.session_id: lesson for lesson in lessons}
    missing = sorted({d.session_id for d in dreams} - set(known))
    found = []
    if earlier is not None:
        for session_id in missing:
            try:
                found.append(earlier(session_id))
            except KeyError:
                continue
    known.update({lesson.session_id: lesson for lesson in lessons_from(found)[0]})
    return [(known[d.session_id], d) for d in dreams if d.session_id in known]


def consolidate_store(model_dir: Path, store_path: Path, out: Path, cfg: DistillConfig,
                      *, site: str = "site", base_version: int = 0, seed: int = 0,
                      rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
                      targets: str | Sequence[str] = "mlp", per_session: bool = False,
                      guard: Sequence[Messages] = (),
                      progress: bool = True) -> SiteConsolidation:
    """The command line's consolidation: the store's unconsumed sessions into `out`
    (update.safetensors, adapter/ as a PEFT folder, consolidation.json). The model runs on
    cfg.device in cfg.dtype; `targets` as `lora.attach_lora` takes them."""
    from fleetmind.client.model import load_model

    model, tokenizer = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    peft_model = lora.attach_lora(model, seed=seed, rank=rank, alpha=alpha, targets=targets)
    with SessionStore(store_path) as store:
        sessions = store.unconsumed()
        if not sessions:
            raise ValueError(f"{store_path}: no sessions that no consolidation has used yet; "
                             "ingest some with `fleetmind client ingest`")
        out.mkdir(parents=True, exist_ok=True)
        replay = ReplayBuffer(out.parent / "replay.db")
        try:
            result = consolidate_sessions(peft_model, tokenizer, sessions, cfg, site=site,
                                          base_version=base_version, seed=seed, guard=guard,
                                          replay=replay, earlier=store.get,
                                          per_session=per_session,
                                          progress=progress)
        finally:
            replay.close()
        atomic_write(out / "update.safetensors", result.update.to_bytes())
        lora.save_adapter(peft_model, out / "adapter")
        record = {"consolidation": result.consolidation_id, "site": site,
                  "base_version": base_version, "sessions": [s.id for s in sessions],
                  "scrubbed": result.scrubbed.as_dict(), "steps": result.stats.steps,
                  "tokens": result.stats.tokens, "tokens_per_s": result.stats.tokens_per_s,
                  "dreams_kept": result.stats.dreams_kept,
                  "turns_dropped": result.stats.turns_dropped}
        atomic_write(out / "consolidation.json", (json.dumps(record, indent=2) + "\n").encode())
        store.record_consolidation(result.consolidation_id, [s.id for s in sessions])
    return result
