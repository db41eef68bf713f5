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
keys (OpenAI's `weight`, ...) are ignored.

Turns are read as today's Chat Completions API writes them (`ChatFormat` holds the
settings), never refusing a whole session for its shape:
- content as a list of parts: the text parts are joined with a newline; image, audio and
  file parts are dropped and counted (`Dropped.parts`);
- `developer` is a system turn; `name` is kept;
- an assistant's `tool_calls` (with `content: null`) and `tool` turns are kept, or dropped
  and counted with `ChatFormat(tools="drop")`;
- a turn left with no text and no tool call is dropped and counted;
- a session over `max_session_bytes` (its canonical JSON) is refused with its size.
Fitting a session to the model's context before consolidation is the model's business
(client/model.py, `fit_to_context`), not the store's.
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

ROLES = ("system", "user", "assistant", "tool")
# What a request may say, and what it becomes: OpenAI's `developer` replaced `system` for
# its reasoning models and means the same thing; `function` is the tool turn before tools.
_ROLE_ALIASES = {"developer": "system", "function": "tool"}
MAX_ID_CHARS = 200
# One conversation of 1 MiB is ~250k tokens, past any context this project serves: a
# bigger "session" is a log file or a paste, not a chat to learn from.
MAX_SESSION_BYTES = 1 << 20
TOOL_SETTINGS = ("keep", "drop")
# Parts of a content list that carry text (Chat Completions, and the Responses API's names).
_TEXT_PARTS = ("text", "input_text", "output_text")
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
class ToolCall:
    """One function call an assistant turn asked for (`arguments` is the JSON text)."""

    id: str
    name: str
    arguments: str = "{}"

    def __post_init__(self) -> None:
        for what in ("id", "name", "arguments"):
            if not isinstance(getattr(self, what), str):
                raise ValueError(f"tool call {what}={getattr(self, what)!r:.40}: must be a "
                                 "string")
        if not self.name.strip():
            raise ValueError("tool call has no function name")

    def as_chat(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    """One chat turn. `tool_calls` only on assistant turns (whose content may then be
    empty), `tool_call_id` only on tool turns."""

    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}: use one of {', '.join(ROLES)} (or "
                             f"{', '.join(_ROLE_ALIASES)}, read as "
                             f"{', '.join(_ROLE_ALIASES.values())})")
        if not isinstance(self.content, str):
            raise ValueError(f"content is a {type(self.content).__name__}: must be a string "
                             "(Session.from_dict flattens content parts to text)")
        if not isinstance(self.tool_calls, tuple) or not all(
                isinstance(call, ToolCall) for call in self.tool_calls):
            raise ValueError("tool_calls must be a tuple of ToolCall")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls on a {self.role} turn: only assistant turns call "
                             "tools")
        if self.tool_call_id is not None and (self.role != "tool"
                                              or not isinstance(self.tool_call_id, str)):
            raise ValueError(f"tool_call_id={self.tool_call_id!r:.40} on a {self.role} turn: "
                             "only tool turns answer a call, by its id (a string)")
        if self.name is not None:
            _check_id("name", self.name)
        if not self.content.strip() and not self.tool_calls:
            raise ValueError("content is empty: drop the turn or the session")

    def as_chat(self) -> dict[str, Any]:
        """The OpenAI chat form, with only the fields that are set (what chat templates
        take, and what the store hashes: a plain turn is {role, content} as before)."""
        turn: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            turn["name"] = self.name
        if self.tool_calls:
            turn["tool_calls"] = [call.as_chat() for call in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn

    @classmethod
    def from_stored(cls, turn: Mapping[str, Any]) -> Message:
        calls = tuple(ToolCall(id=c["id"], name=c["function"]["name"],
                               arguments=c["function"]["arguments"])
                      for c in turn.get("tool_calls", ()))
        return cls(role=turn["role"], content=turn["content"], name=turn.get("name"),
                   tool_calls=calls, tool_call_id=turn.get("tool_call_id"))


@dataclass(frozen=True)
class ChatFormat:
    """How ingest reads today's chat format: keep or drop tool turns, and the size cap."""

    tools: str = "keep"
    max_session_bytes: int = MAX_SESSION_BYTES

    def __post_init__(self) -> None:
        if self.tools not in TOOL_SETTINGS:
            raise ValueError(f"tools={self.tools!r}: use one of {', '.join(TOOL_SETTINGS)}")
        if isinstance(self.max_session_bytes, bool) or not isinstance(
                self.max_session_bytes, int) or self.max_session_bytes < 1:
            raise ValueError(f"max_session_bytes={self.max_session_bytes!r}: a whole number "
                             ">= 1")


DEFAULT_CHAT_FORMAT = ChatFormat()


@dataclass(frozen=True)
class Dropped:
    """What reading sessions left out, counted: non-text content parts, tool turns and
    tool calls (with tools="drop"), and turns left with nothing in them."""

    parts: int = 0
    tool_turns: int = 0
    empty_turns: int = 0

    def __add__(self, other: Dropped) -> Dropped:
        return Dropped(self.parts + other.parts, self.tool_turns + other.tool_turns,
                       self.empty_turns + other.empty_turns)

    @property
    def total(self) -> int:
        return self.parts + self.tool_turns + self.empty_turns

    def as_dict(self) -> dict[str, int]:
        return {"parts": self.parts, "tool_turns": self.tool_turns,
                "empty_turns": self.empty_turns}


def _content_text(content: Any, where: str) -> tuple[str, int]:
    """(text, non-text parts dropped) of a turn's content: a string, null, or parts."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise ValueError(f"{where}.content is a {type(content).__name__}: use a string, null "
                         "or a list of content parts")
    texts, dropped = [], 0
    for number, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise ValueError(f"{where}.content[{number}] must be an object with a 'type'")
        if part["type"] in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}.content[{number}] is a text part without a "
                                 "'text' string")
            texts.append(part["text"])
        else:
            dropped += 1  # image_url, input_audio, file, refusal...: nothing to learn as text
    return "\n".join(texts), dropped


def _tool_calls(turn: Mapping[str, Any], where: str) -> tuple[ToolCall, ...]:
    raw = turn.get("tool_calls") or []
    if turn.get("function_call"):  # the API's single call before `tool_calls`
        raw = [*raw, {"id": "", "function": turn["function_call"]}]
    if not isinstance(raw, list):
        raise ValueError(f"{where}.tool_calls must be a list")
    calls = []
    for number, call in enumerate(raw):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ValueError(f"{where}.tool_calls[{number}] must be an object with a "
                             "'function' object")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):  # some clients send the object itself
            arguments = json.dumps(arguments, sort_keys=True, ensure_ascii=False)
        try:
            calls.append(ToolCall(id=str(call.get("id") or ""),
                                  name=function.get("name") or "", arguments=arguments))
        except ValueError as error:
            raise ValueError(f"{where}.tool_calls[{number}]: {error}") from None
    return tuple(calls)


def _read_turn(index: int, turn: Any, fmt: ChatFormat) -> tuple[Message | None, Dropped]:
    """One turn of a request or a JSONL line: a Message, or None when it is dropped."""
    where = f"messages[{index}]"
    if not isinstance(turn, Mapping) or "role" not in turn:
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    role = _ROLE_ALIASES.get(turn["role"], turn["role"])
    if role not in ROLES:
        raise ValueError(f"{where}.role={turn['role']!r}: use one of "
                         f"{', '.join((*ROLES, *_ROLE_ALIASES))}")
    if "content" not in turn and not turn.get("tool_calls") and not turn.get("function_call"):
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    text, parts = _content_text(turn.get("content"), where)
    calls = _tool_calls(turn, where) if role == "assistant" else ()
    if role == "tool" and fmt.tools == "drop":
        return None, Dropped(parts=parts, tool_turns=1)
    dropped_calls = 0
    if calls and fmt.tools == "drop":
        calls, dropped_calls = (), 1
    if not text.strip() and not calls:
        return None, Dropped(parts=parts, tool_turns=dropped_calls,
                             empty_turns=0 if dropped_calls else 1)
    call_id = turn.get("tool_call_id") if role == "tool" else None
    name = turn.get("name")
    try:
        message = Message(role=role, content=text, name=name if name else None,
                          tool_calls=calls, tool_call_id=None if call_id is None else
                          str(call_id))
    except ValueError as error:
        raise ValueError(f"{where}.{error}") from None
    return message, Dropped(parts=parts, tool_turns=dropped_calls)


def read_messages(turns: Any, fmt: ChatFormat = ChatFormat()
                  ) -> tuple[tuple[Message, ...], Dropped]:
    """The turns of a chat (a JSONL line's or a request's `messages`) as Messages, and what
    was dropped; ValueError naming the turn and field for what cannot be read."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects,"
                         f" got {turns!r:.40}")
    messages, dropped = [], Dropped()
    for index, turn in enumerate(turns):
        message, left_out = _read_turn(index, turn, fmt)
        dropped += left_out
        if message is not None:
            messages.append(message)
    return tuple(messages), dropped


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
    def from_dict(cls, raw: Any, fmt: ChatFormat = ChatFormat()) -> Session:
        """From one JSON object of a chat JSONL file; errors say which field is wrong."""
        return cls.read(raw, fmt)[0]

    @classmethod
    def read(cls, raw: Any, fmt: ChatFormat = ChatFormat()) -> tuple[Session, Dropped]:
        """`from_dict`, also saying what was dropped (content parts, tool turns, empty
        turns) on the way."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a JSON object with 'messages', got "
                             f"{type(raw).__name__}")
        messages, dropped = read_messages(raw.get("messages"), fmt)
        size = len(_canonical_json(messages).encode())
        if size > fmt.max_session_bytes:
            raise ValueError(f"session is {size} bytes of messages, over the cap of "
                             f"{fmt.max_session_bytes} per session (max_session_bytes): split "
                             "the conversation, or raise the cap if it really is one chat")
        session_id = raw.get("id", "sha256:" + content_hash(messages)[:16])
        return cls(id=session_id, messages=messages, user=raw.get("user")), dropped

    def to_dict(self) -> dict[str, Any]:
        """The chat JSONL form: `Session.from_dict(s.to_dict()) == s`."""
        row: dict[str, Any] = {"id": self.id, "messages": _message_dicts(self.messages)}
        if self.user is not None:
            row["user"] = self.user
        return row

    @cached_property
    def content_hash(self) -> str:
        return content_hash(self.messages, self.user)


def _message_dicts(messages: Iterable[Message]) -> list[dict[str, Any]]:
    return [message.as_chat() for message in messages]


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


def parse_line(raw: bytes, fmt: ChatFormat = ChatFormat()) -> Session | None:
    """One line of a chat JSONL file: a Session, None for a blank line, ValueError else."""
    read = read_line(raw, fmt)
    return None if read is None else read[0]


def read_line(raw: bytes, fmt: ChatFormat = ChatFormat()) -> tuple[Session, Dropped] | None:
    """`parse_line`, also saying what was dropped."""
    # JSON escapes and whitespace can make a line a few times its content; past that, the
    # session is over the cap whatever it holds, and parsing it would only fill memory.
    if len(raw) > 8 * fmt.max_session_bytes:
        raise ValueError(f"line is {len(raw)} bytes, far over the cap of "
                         f"{fmt.max_session_bytes} per session (max_session_bytes): split "
                         "the conversation")
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
    return Session.read(obj, fmt)


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
    in `problems`, and what the sessions read left out (`dropped`)."""

    path: Path
    stored: int
    duplicates: int
    rejected: int
    problems: tuple[LineProblem, ...]
    dropped: Dropped = Dropped()

    def __post_init__(self) -> None:
        if min(self.stored, self.duplicates, self.rejected) < 0:
            raise ValueError(f"counts must be >= 0: stored={self.stored}, "
                             f"duplicates={self.duplicates}, rejected={self.rejected}")
        if len(self.problems) > self.rejected:
            raise ValueError(f"{len(self.problems)} problems for {self.rejected} rejected lines")


@dataclass(frozen=True)
class StoreStats:
    """What a store holds. `without_user`: sessions with no end-user id, which user-level
    DP cannot attribute (each counts as its own user there)."""

    sessions: int
    users: int
    unconsumed: int
    without_user: int
    consolidations: int
    oldest_added_at: float | None = None
    newest_added_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "users": self.users,
                "unconsumed": self.unconsumed, "without_user": self.without_user,
                "consolidations": self.consolidations,
                "oldest_added_at": self.oldest_added_at,
                "newest_added_at": self.newest_added_at}


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
                    batch: int = INGEST_BATCH, fmt: ChatFormat = ChatFormat()) -> IngestReport:
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
        dropped = Dropped()

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
                    read = read_line(raw, fmt)
                except ValueError as error:
                    reject(number, str(error))
                    continue
                if read is not None:
                    pending.append((number, read[0]))
                    dropped += read[1]
                if len(pending) >= batch:
                    commit(pending)
                    pending = []
        commit(pending)
        return IngestReport(path=path, stored=stored, duplicates=duplicates, rejected=rejected,
                            problems=tuple(sorted(problems, key=lambda p: p.line)),
                            dropped=dropped)

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

    def find(self, digest: str) -> str | None:
        """The id of the stored session with this content hash (`Session.content_hash`), if
        any: how a conversation that continues an earlier one finds it."""
        row = self._db.execute("SELECT id FROM sessions WHERE content_hash = ?",
                               (digest,)).fetchone()
        return None if row is None else row[0]

    def stats(self) -> StoreStats:
        """Counts for `fleetmind client sessions` and the site's metrics."""
        sessions, users, without_user, oldest, newest = self._db.execute(
            "SELECT count(*), count(DISTINCT user), count(*) - count(user), min(added_at), "
            "max(added_at) FROM sessions").fetchone()
        unconsumed = self._db.execute(
            "SELECT count(*) FROM sessions WHERE id NOT IN "
            "(SELECT session_id FROM consolidation_sessions)").fetchone()[0]
        consolidations = self._db.execute("SELECT count(*) FROM consolidations").fetchone()[0]
        return StoreStats(sessions=sessions, users=users, unconsumed=unconsumed,
                          without_user=without_user, consolidations=consolidations,
                          oldest_added_at=oldest, newest_added_at=newest)

    # -- changing and forgetting -----------------------------------------------------------

    def replace(self, session: Session) -> bool:
        """Puts `session` in place of the stored session with its id (a conversation that
        went on: same id, more turns), keeping its place in arrival order. True if replaced,
        False if the same messages are already stored (under any id). ValueError when no
        session has the id, or when a consolidation already used it: what was learned from
        is never rewritten (the outbox names it), so store the continuation as a new one."""
        with self._transaction():
            if session.id not in self:
                raise ValueError(f"no session {session.id!r} to replace; add it instead")
            if self.consolidations_using(session.id):
                raise ValueError(f"session {session.id!r} was used by a consolidation and is "
                                 "never rewritten; store the continuation under a new id")
            same = self.find(session.content_hash)
            if same is not None:
                return False
            self._db.execute(
                "UPDATE sessions SET content_hash = ?, user = ?, messages = ?, added_at = ? "
                "WHERE id = ?", (session.content_hash, session.user,
                                 _canonical_json(session.messages), time.time(), session.id))
        return True

    def user_sessions(self, user: str) -> list[str]:
        """Ids of an end user's sessions, sorted."""
        _check_id("user", user)
        return [row[0] for row in self._db.execute(
            "SELECT id FROM sessions WHERE user = ? ORDER BY id", (user,))]

    def delete_user(self, user: str) -> list[str]:
        """Deletes every session of `user` (the right to erasure), and the record of which
        consolidations used them (the outbox keeps the ids, never the text). Returns the
        deleted ids, sorted."""
        _check_id("user", user)
        return self._delete("WHERE user = ?", (user,))

    def expire(self, max_age_s: float, now: float | None = None) -> list[str]:
        """Deletes the sessions stored (or last continued) more than `max_age_s` seconds
        ago: the store's retention TTL. Returns the deleted ids, sorted."""
        if isinstance(max_age_s, bool) or not isinstance(max_age_s, int | float) \
                or not max_age_s > 0:
            raise ValueError(f"max_age_s={max_age_s!r}: a TTL is a number of seconds > 0")
        cutoff = (time.time() if now is None else now) - max_age_s
        return self._delete("WHERE added_at < ?", (cutoff,))

    def _delete(self, where: str, args: tuple[Any, ...]) -> list[str]:
        with self._transaction():
            ids = [row[0] for row in self._db.execute(
                f"SELECT id FROM sessions {where} ORDER BY id", args)]
            for chunk in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[chunk:chunk + 500]
                marks = ",".join("?" * len(part))
                self._db.execute(f"DELETE FROM consolidation_sessions WHERE session_id IN "
                                 f"({marks})", part)
                self._db.execute(f"DELETE FROM sessions WHERE id IN ({marks})", part)
        return ids

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
                   messages=tuple(Message.from_stored(turn) for turn in json.loads(messages)))

