"""Callers waiting for one kind of news (a version published, a ledger entry appended), each
on its own event, so that a waiting stream never wakes to poll."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Waiters:
    """Callers waiting for one kind of news, each sleeping on its own event. `notify` sets
    them all; a caller's event may also be set by someone else (its stream's caller hanging
    up), so a stream sleeps until news or departure and never wakes to poll: 5,000 idle
    Watch streams polling once a second made a round beside them 5x slower (docs/scale.md,
    "5,000 watchers held")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: set[threading.Event] = set()

    def wait(self, ready: Callable[[], bool], timeout: float,
             wake: threading.Event | None = None) -> bool:
        """Waits up to `timeout` until `ready()`, woken by `notify` or by `wake` being set
        (already set: no wait). Returns `ready()`."""
        event = wake if wake is not None else threading.Event()
        with self._lock:
            self._events.add(event)
        try:
            if not ready():
                event.wait(max(0.0, timeout))
            return ready()
        finally:
            with self._lock:
                self._events.discard(event)

    def notify(self) -> None:
        with self._lock:
            events = list(self._events)
        for event in events:
            event.set()
