"""Capture: every completed conversation the endpoint answers becomes a session in the
site's store, off the response path.

The endpoint hands each finished exchange to `Capture.submit`, which only enqueues it; one
worker thread owns the store (SQLite with a durable commit per write, milliseconds the
response never waits for) and records it:

- keyed to the end user: the configured header, else the request's `user` field; a
  session with neither is stored and counted (`without_user`), since user-level DP treats
  it as a user of its own;
- stitched: a conversation that goes on across requests is one session, not fragments.
  With a conversation id (the configured header or `metadata.conversation_id`) the session
  id is derived from it; without one, a request whose messages begin with a stored
  session's whole conversation continues that session. A session a consolidation already
  used is never rewritten (the outbox names it): the continuation becomes a new segment;
- not stored: requests with `store: false`, everything when the site-wide switch is off,
  and requests that failed (the endpoint never submits them).

The retention TTL runs on the same thread.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetmind.client.serve.metrics import ServeMetrics
from fleetmind.client.store import (
    DEFAULT_CHAT_FORMAT,
    ChatFormat,
    Message,
    Session,
    SessionStore,
    ToolCall,
    content_hash,
)

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000  # exchanges waiting; past it new ones are dropped (counted), never waited on
_SWEEP_EVERY_S = 60.0


@dataclass(frozen=True)
class Exchange:
    """One answered request: the turns it sent, the reply, who, and which conversation."""

    messages: tuple[Message, ...]
    reply: Message
    user: str | None = None
    conversation_id: str | None = None


def reply_from_completion(completion: dict[str, Any]) -> Message | None:
    """The assistant turn of a `chat.completion` object (None when it said nothing)."""
    try:
        message = completion["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    return _reply(message.get("content") or "", [
        (c.get("id", ""), c.get("function", {}).get("name"), c.get("function", {}).get(
            "arguments", "")) for c in message.get("tool_calls") or []])


class StreamTranscript:
    """Folds the chunks of a streamed completion into the reply they spell."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._calls: dict[int, list[str]] = {}
        self.finished = False
        self.usage: dict[str, int] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = self._calls.setdefault(call.get("index", 0), ["", "", ""])
                function = call.get("function") or {}
                slot[0] += call.get("id") or ""
                slot[1] += function.get("name") or ""
                slot[2] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finished = True

    def reply(self) -> Message | None:
        return _reply("".join(self._content), [tuple(self._calls[i]) for i in
                                               sorted(self._calls)])


def _reply(content: str, calls: list[tuple[Any, ...]]) -> Message | None:
    try:
        tool_calls = tuple(ToolCall(id=str(i or ""), name=n, arguments=a or "{}")
                           for i, n, a in calls)
        return Message("assistant", content, tool_calls=tool_calls)
    except ValueError:  # an empty reply, or a nameless call: nothing to learn from
        return None


def conversation_session_id(user: str | None, conversation_id: str, segment: int = 1) -> str:
    """A stable session id for a conversation id (hashed: the id is the client's text),
    one per segment (a new segment after a consolidation used the previous one)."""
    digest = hashlib.sha256(f"{user or ''}\0{conversation_id}".encode()).hexdigest()[:32]
    return f"conv-{digest}" + (f"-{segment}" if segment > 1 else "")


def record(store: SessionStore, exchange: Exchange, fmt: ChatFormat = DEFAULT_CHAT_FORMAT) -> str:
    """Stores one exchange; returns the outcome: new, continued, duplicate or invalid."""
    messages = (*exchange.messages, exchange.reply)
    size = sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in messages)
    if size > fmt.max_session_bytes:
        log.warning("conversation of %d characters not stored: over max_session_bytes=%d",
                    size, fmt.max_session_bytes)
        return "invalid"
    if exchange.conversation_id is not None:
        segment = 1
        while True:
            session_id = conversation_session_id(exchange.user, exchange.conversation_id,
                                                 segment)
            if session_id not in store or not store.consolidations_using(session_id):
                break
            segment += 1
        return _put(store, session_id, messages, exchange.user)
    # No id: does this request continue a stored conversation? Its prefixes that end on an
    # assistant turn are the candidates, longest first.
    for end in range(len(exchange.messages), 0, -1):
        if exchange.messages[end - 1].role != "assistant":
            continue
        earlier = store.find(content_hash(exchange.messages[:end], exchange.user))
        if earlier is not None and not store.consolidations_using(earlier):
            return _put(store, earlier, messages, exchange.user)
    return _put(store, f"srv-{uuid.uuid4().hex}", messages, exchange.user)


def _put(store: SessionStore, session_id: str, messages: tuple[Message, ...],
         user: str | None) -> str:
    try:
        session = Session(id=session_id, messages=messages, user=user)
    except ValueError as error:  # e.g. no user turn: nothing a lesson can start from
        log.warning("conversation not stored: %s", error)
        return "invalid"
    if session_id in store:
        return "continued" if store.replace(session) else "duplicate"
    return "new" if store.add(session) else "duplicate"


class Capture:
    """The capture worker of one endpoint. `submit` never blocks; `join` waits until what
    was submitted is stored (for tests and shutdown)."""

    def __init__(self, store_path: Path | None, metrics: ServeMetrics, *, enabled: bool = True,
                 fmt: ChatFormat = DEFAULT_CHAT_FORMAT, ttl_s: float | None = None) -> None:
        self.store_path = None if store_path is None else Path(store_path)
        self.enabled = enabled and self.store_path is not None
        self.metrics, self.fmt, self.ttl_s = metrics, fmt, ttl_s
        self._queue: queue.Queue[Exchange | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.store_path is None or self._thread is not None:
            return
        if self.store_path.suffix != ".db":
            self.store_path.mkdir(parents=True, exist_ok=True)
        SessionStore(self.store_path).close()  # a bad path fails at start, not in the worker
        self._thread = threading.Thread(target=self._work, args=(self.store_path,),
                                        name="fleetmind-capture", daemon=True)
        self._thread.start()

    def skipped(self, reason: str) -> None:
        self.metrics.captured.labels(reason).inc()

    def submit(self, exchange: Exchange) -> None:
        if not self.enabled or self._thread is None:
            self.skipped("disabled")
            return
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:
            log.warning("capture queue full (%d): a conversation was not stored", QUEUE_LIMIT)
            self.skipped("failed")
            return
        self.metrics.capture_queue.set(self._queue.qsize())

    def join(self) -> None:
        self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _work(self, store_path: Path) -> None:
        with SessionStore(store_path) as store:
            last_sweep = 0.0
            while True:
                if self.ttl_s is not None and time.monotonic() - last_sweep >= min(
                        _SWEEP_EVERY_S, self.ttl_s):
                    self._sweep(store, self.ttl_s)
                    last_sweep = time.monotonic()
                try:
                    exchange = self._queue.get(timeout=1.0)
                except queue.Empty:
                    continue
                try:
                    if exchange is None:
                        return
                    self._record(store, exchange)
                finally:
                    self._queue.task_done()
                    self.metrics.capture_queue.set(self._queue.qsize())

    def _record(self, store: SessionStore, exchange: Exchange) -> None:
        try:
            outcome = record(store, exchange, self.fmt)
        except Exception:  # a broken store must not take the endpoint down: log, count
            log.exception("capture failed; the conversation was not stored")
            outcome = "failed"
        self.metrics.captured.labels(outcome).inc()
        if outcome == "new" and exchange.user is None:
            self.metrics.without_user.inc()

    def _sweep(self, store: SessionStore, ttl_s: float) -> None:
        try:
            gone = store.expire(ttl_s)
        except Exception:
            log.exception("retention sweep failed")
            return
        if gone:
            log.info("retention: deleted %d sessions older than %.0f s", len(gone), ttl_s)
            self.metrics.expired.inc(len(gone))
