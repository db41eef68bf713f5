"""A site's session store: every chat session the site may learn from, in one SQLite file.

WAL journal with synchronous=FULL: a commit is on disk before it returns, so a session
acknowledged as stored survives kill -9 and power loss, and readers (the distiller) never
block the writer (ingest). Sessions are deduplicated by the SHA-256 of their user and
messages' canonical JSON (the same user sending the same conversation twice is one session;
two users saying the same thing are two, since what several users say is what the fleet
should learn and session-level DP counts them apart), and the store remembers which
sessions each consolidation used: the outbox lists them, and the privacy accountant counts
every re-use of a session.

Input is OpenAI chat JSONL, one session per line:
    {"id": "s1", "user": "u7", "messages": [{"role": "user", "content": "..."}, ...]}
`user` (the end-user id, the privacy unit when DP is per user) is optional. So is `id`,
as in OpenAI's fine-tuning files: a line without one is named by its content hash. Other
keys (OpenAI's `weight`, `name`, ...) are ignored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_ID_CHARS = 200
# A file full of garbage should not fill memory with problems: keep the first ones, count all.
MAX_PROBLEMS_KEPT = 100
# Lines per transaction during ingest: each commit is an fsync, so one per line would make
# ingest disk-bound; an acknowledgement waits at most this many lines.
INGEST_BATCH = 64
SCHEMA_VERSION = 1
# "FLMS" in SQLite's application_id header field: tells our stores from other SQLite files.
APPLICATION_ID = 0x464C4D53
STORE_FILENAME = "sessions.db"

_SCHEMA = """
CREATE TABLE sessions (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    id           TEXT NOT NULL UNIQUE,
    content_hash TEXT NOT NULL UNIQUE,
    user         TEXT,
    messages     TEXT NOT NULL,                      -- canonical JSON
    added_at     REAL NOT NULL
);
CREATE TABLE consolidations (
    id          TEXT PRIMARY KEY,
    recorded_at REAL NOT NULL
);
CREATE TABLE consolidation_sessions (
    consolidation_id TEXT NOT NULL REFERENCES consolidations(id),
    session_id       TEXT NOT NULL REFERENCES sessions(id),
    PRIMARY KEY (consolidation_id, session_id)
);
CREATE INDEX consolidation_sessions_by_session ON consolidation_sessions(session_id);
"""


def _check_id(what: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}={value!r}: must be a non-empty string")
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        shown = f"{value[:40]!r}{'...' if len(value) > 40 else ''}"
        raise ValueError(f"{what}={shown}: use at most {MAX_ID_CHARS} printable characters")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}: use one of {', '.join(ROLES)} "
                             "(tool and function turns are not sessions to learn from)")
        if not isinstance(self.content, str):
            raise ValueError(f"content is a {type(self.content).__name__}: must be a string "
                             "(flatten multi-part content to text first)")
        if not self.content.strip():
            raise ValueError("content is empty: drop the turn or the session")


@dataclass(frozen=True)
class Session:
    """One conversation as the site saw it (before scrubbing), validated at construction."""

    id: str
    messages: tuple[Message, ...]
    user: str | None = None

    def __post_init__(self) -> None:
        _check_id("id", self.id)
        if self.user is not None:
            _check_id("user", self.user)
        if not isinstance(self.messages, tuple) or not all(
                isinstance(message, Message) for message in self.messages):
            raise ValueError("messages must be a tuple of Message")
        if not any(message.role == "user" for message in self.messages):
            raise ValueError("messages have no user turn: a session needs at least one")

    @classmethod
    def from_dict(cls, raw: Any) -> Session:
        """From one JSON object of a chat JSONL file; errors say which field is wrong."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a JSON object with 'messages', got "
                             f"{type(raw).__name__}")
        turns = raw.get("messages")
        if not isinstance(turns, list) or not turns:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects,"
                             f" got {turns!r:.40}")
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or "role" not in turn or "content" not in turn:
                raise ValueError(f"messages[{index}] must be an object with 'role' and "
                                 "'content'")
            try:
                messages.append(Message(role=turn["role"], content=turn["content"]))
            except ValueError as error:
                raise ValueError(f"messages[{index}].{error}") from None
        messages_tuple = tuple(messages)
        session_id = raw.get("id", "sha256:" + content_hash(messages_tuple)[:16])
        return cls(id=session_id, messages=messages_tuple, user=raw.get("user"))

    def to_dict(self) -> dict[str, Any]:
        """The chat JSONL form: `Session.from_dict(s.to_dict()) == s`."""
        row: dict[str, Any] = {"id": self.id, "messages": _message_dicts(self.messages)}
        if self.user is not None:
            row["user"] = self.user
        return row

    @cached_property
    def content_hash(self) -> str:
        return content_hash(self.messages, self.user)


def _message_dicts(messages: Iterable[Message]) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]


def _canonical_json(messages: Iterable[Message]) -> str:
    return json.dumps(_message_dicts(messages), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def content_hash(messages: Iterable[Message], user: str | None = None) -> str:
    """SHA-256 (hex) of the messages' canonical JSON, and of the user's id when there is one:
    what deduplication compares."""
    text = _canonical_json(messages)
    if user is not None:
        text = json.dumps({"user": user, "messages": json.loads(text)}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_line(raw: bytes) -> Session | None:
    """One line of a chat JSONL file: a Session, None for a blank line, ValueError else."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 (byte {error.start}): re-encode the file as UTF-8") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg}, column {error.colno}): each line must "
                         "be one JSON object") from None
    return Session.from_dict(obj)


@dataclass(frozen=True)
class LineProblem:
    """A line that was skipped, and why."""

    path: Path
    line: int
    message: str

    def __post_init__(self) -> None:
        if self.line < 1:
            raise ValueError(f"line={self.line}: lines are numbered from 1")

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class IngestReport:
    """What one file brought: `stored` new sessions, `duplicates` already in the store (or
    earlier in the file), `rejected` lines skipped, the first `MAX_PROBLEMS_KEPT` of them
    in `problems`."""

    path: Path
    stored: int
    duplicates: int
    rejected: int
    problems: tuple[LineProblem, ...]

    def __post_init__(self) -> None:
        if min(self.stored, self.duplicates, self.rejected) < 0:
            raise ValueError(f"counts must be >= 0: stored={self.stored}, "
                             f"duplicates={self.duplicates}, rejected={self.rejected}")
        if len(self.problems) > self.rejected:
            raise ValueError(f"{len(self.problems)} problems for {self.rejected} rejected lines")


class SessionStore:
    """`SessionStore(path)` opens (creating if needed) the store at `path`, a database file,
    or `path/sessions.db` when `path` is a folder, such as the site's data folder."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / STORE_FILENAME if path.is_dir() else path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self._open()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise ValueError(f"{self.path}: not a session store ({error}); pass a store "
                             "written by fleetmind or a path for a new one") from None
        except ValueError:
            self._db.close()
            raise

    def _open(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise ValueError(f"{self.path}: the file system refused WAL mode (got {mode!r}); "
                             "put the store on a local disk")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            app = self._db.execute("PRAGMA application_id").fetchone()[0]
            tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if version == 0 and tables == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            elif app != APPLICATION_ID:
                raise ValueError(f"{self.path}: a SQLite file, but not a fleetmind session "
                                 "store; pass another path")
            elif version > SCHEMA_VERSION:
                raise ValueError(f"{self.path}: written by a newer fleetmind (schema {version},"
                                 f" this one reads {SCHEMA_VERSION}); upgrade fleetmind")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception. IMMEDIATE takes the
        write lock up front, so two writers queue (busy timeout) instead of failing midway."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- adding ----------------------------------------------------------------------------

    def add(self, session: Session | Mapping[str, Any]) -> bool:
        """Stores one session, durably before returning. True if new, False if a session
        with the same messages is already stored. ValueError if it is invalid, or if its id
        is taken by a session with other messages."""
        if not isinstance(session, Session):
            session = Session.from_dict(session)
        with self._transaction():
            return self._insert(session)

    def _insert(self, session: Session) -> bool:
        try:
            self._db.execute(
                "INSERT INTO sessions (id, content_hash, user, messages, added_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (session.id, session.content_hash, session.user,
                 _canonical_json(session.messages), time.time()))
        except sqlite3.IntegrityError:
            same = self._db.execute("SELECT 1 FROM sessions WHERE content_hash = ?",
                                    (session.content_hash,)).fetchone()
            if same:
                return False
            raise ValueError(f"id {session.id!r} is already stored with other messages: "
                             "give each session a unique id") from None
        return True

    def ingest_file(self, path: str | Path, *, on_stored: Callable[[str], None] | None = None,
                    batch: int = INGEST_BATCH) -> IngestReport:
        """Stores every valid session of a chat JSONL file; skips and reports bad lines.

        `on_stored(session_id)` is called for each new session once it is committed to disk,
        never before: what it acknowledges survives a crash."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; pass a chat JSONL file (one "
                                    "session per line)")
        if batch < 1:
            raise ValueError(f"batch={batch}: must be at least 1")
        stored = duplicates = rejected = 0
        problems: list[LineProblem] = []

        def reject(line: int, message: str) -> None:
            nonlocal rejected
            rejected += 1
            if len(problems) < MAX_PROBLEMS_KEPT:
                problems.append(LineProblem(path, line, message))

        def commit(pending: list[tuple[int, Session]]) -> None:
            nonlocal stored, duplicates
            added = []
            with self._transaction():
                for line, session in pending:
                    try:
                        if self._insert(session):
                            added.append(session.id)
                        else:
                            duplicates += 1
                    except ValueError as error:
                        reject(line, str(error))
            stored += len(added)
            if on_stored is not None:
                for session_id in added:
                    on_stored(session_id)

        pending: list[tuple[int, Session]] = []
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    session = parse_line(raw)
                except ValueError as error:
                    reject(number, str(error))
                    continue
                if session is not None:
                    pending.append((number, session))
                if len(pending) >= batch:
                    commit(pending)
                    pending = []
        commit(pending)
        return IngestReport(path=path, stored=stored, duplicates=duplicates, rejected=rejected,
                            problems=tuple(sorted(problems, key=lambda p: p.line)))

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM sessions").fetchone()[0]

    def __contains__(self, session_id: object) -> bool:
        return isinstance(session_id, str) and self._db.execute(
            "SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def __iter__(self) -> Iterator[Session]:
        """Every session, in arrival order."""
        return self._sessions("SELECT id, user, messages FROM sessions ORDER BY seq")

    def get(self, session_id: str) -> Session:
        row = self._db.execute("SELECT id, user, messages FROM sessions WHERE id = ?",
                               (session_id,)).fetchone()
        if row is None:
            raise KeyError(f"no session {session_id!r} in {self.path}")
        return _session_from_row(row)

    def unconsumed(self) -> list[Session]:
        """Sessions no consolidation has used yet, in arrival order."""
        return list(self._sessions(
            "SELECT id, user, messages FROM sessions WHERE id NOT IN "
            "(SELECT session_id FROM consolidation_sessions) ORDER BY seq"))

    def _sessions(self, query: str) -> Iterator[Session]:
        for row in self._db.execute(query):
            yield _session_from_row(row)

    # -- consolidations --------------------------------------------------------------------

    def record_consolidation(self, consolidation_id: str, session_ids: Iterable[str]) -> None:
        """Records that `consolidation_id` learned from `session_ids`. Recording the same
        set again is a no-op (a retried consolidation); a different set is an error."""
        _check_id("consolidation_id", consolidation_id)
        wanted = sorted(set(session_ids))
        if not wanted:
            raise ValueError(f"consolidation {consolidation_id!r}: no sessions; a "
                             "consolidation uses at least one")
        with self._transaction():
            missing = [s for s in wanted if s not in self]
            if missing:
                raise ValueError(f"consolidation {consolidation_id!r}: unknown session ids "
                                 f"{missing[:5]}{'...' if len(missing) > 5 else ''}; store "
                                 "the sessions first")
            recorded = self.sessions_used_by(consolidation_id)
            if recorded:
                if recorded != wanted:
                    raise ValueError(f"consolidation {consolidation_id!r} is already recorded "
                                     f"with {len(recorded)} other sessions; use a new id")
                return
            self._db.execute("INSERT INTO consolidations (id, recorded_at) VALUES (?, ?)",
                             (consolidation_id, time.time()))
            self._db.executemany(
                "INSERT INTO consolidation_sessions (consolidation_id, session_id) "
                "VALUES (?, ?)", [(consolidation_id, s) for s in wanted])

    def sessions_used_by(self, consolidation_id: str) -> list[str]:
        """Ids of the sessions a consolidation used, sorted; empty if it is not recorded."""
        return [row[0] for row in self._db.execute(
            "SELECT session_id FROM consolidation_sessions WHERE consolidation_id = ? "
            "ORDER BY session_id", (consolidation_id,))]

    def consolidations_using(self, session_id: str) -> list[str]:
        """Ids of the consolidations that used a session, oldest first."""
        return [row[0] for row in self._db.execute(
            "SELECT c.id FROM consolidations c JOIN consolidation_sessions u "
            "ON u.consolidation_id = c.id WHERE u.session_id = ? ORDER BY c.recorded_at, c.id",
            (session_id,))]


def _session_from_row(row: tuple[str, str | None, str]) -> Session:
    session_id, user, messages = row
    return Session(id=session_id, user=user,
                   messages=tuple(Message(**turn) for turn in json.loads(messages)))
