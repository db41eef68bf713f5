"""The replay buffer: dreams kept from earlier consolidations, rehearsed in later ones so old
lessons are not overwritten. SQLite (WAL), capped: past the cap the oldest dreams go.

A replayed dream re-uses its session, which the privacy accountant must count: the buffer
records the session id of every dream for that reason.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

from fleetmind.client.dreams import Dream

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dreams (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    prompt     TEXT NOT NULL,
    confidence REAL NOT NULL,
    UNIQUE (session_id, prompt)
);
"""


class ReplayBuffer:
    def __init__(self, path: str | Path, capacity: int = 2000) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity={capacity} must be at least 1")
        self.path = Path(path)
        self.capacity = capacity
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add(self, dreams: list[Dream]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO dreams (session_id, prompt, confidence) VALUES (?, ?, ?)",
                [(d.session_id, json.dumps(list(d.prompt), sort_keys=True), d.confidence)
                 for d in dreams])
            self._db.execute("DELETE FROM dreams WHERE seq NOT IN (SELECT seq FROM dreams "
                             "ORDER BY seq DESC LIMIT ?)", (self.capacity,))

    def sample(self, count: int, rng: random.Random) -> list[Dream]:
        rows = self._db.execute("SELECT session_id, prompt, confidence FROM dreams "
                                "ORDER BY seq").fetchall()
        chosen = rng.sample(rows, min(count, len(rows)))
        return [Dream(s, tuple(json.loads(p)), c) for s, p, c in chosen]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM dreams").fetchone()[0]

    def close(self) -> None:
        self._db.close()
