"""Callers waiting for one kind of news (a version published, a ledger entry appended, a
site's round events), each on its own event, so that a waiting stream never wakes to poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Waiters:
    """Callers waiting for one kind of news, each sleeping on its own event. `notify` sets
    them all; a caller's event may also be set by someone else (its stream's caller hanging
    up), so a stream sleeps until news or departure and never wakes to poll: 5,000 idle
    Watch streams polling once a second made a round beside them 5x slower (docs/scale.md,
    "5,000 watchers held").

    `notify` returns the waits it woke (one token per call of `wait`), and `wait_left`
    waits until each of them has looked at the news and left: the coordinator tells a
    round's sites their outcome before it wakes the version's watchers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = threading.Condition(self._lock)
        self._waiting: dict[object, threading.Event] = {}

    def wait(self, ready: Callable[[], bool], timeout: float,
             wake: threading.Event | None = None) -> bool:
        """Waits up to `timeout` until `ready()`, woken by `notify` or by `wake` being set
        (already set: no wait). Returns `ready()`."""
        event = wake if wake is not None else threading.Event()
        token = object()
        with self._lock:
            self._waiting[token] = event
        try:
            if not ready():
                event.wait(max(0.0, timeout))
            return ready()
        finally:
            with self._lock:
                del self._waiting[token]
                self._left.notify_all()

    def notify(self) -> frozenset[object]:
        """Wakes every caller waiting now; returns their waits (for `wait_left`)."""
        with self._lock:
            waiting = dict(self._waiting)
        for event in waiting.values():
            event.set()
        return frozenset(waiting)

    def wait_left(self, woken: frozenset[object], timeout: float) -> bool:
        """Waits up to `timeout` until none of the waits `woken` (from `notify`) is still in
        `wait`: each re-checked `ready()` and returned. Returns whether they all did."""
        ends = time.monotonic() + timeout
        with self._lock:
            while not woken.isdisjoint(self._waiting):
                left = ends - time.monotonic()
                if left <= 0:
                    return False
                self._left.wait(left)
            return True
