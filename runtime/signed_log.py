"""The signed, append-only SQLite log under the site's outbox and the aggregator's ledger.

One row per entry: the chain's fields (fleetmind.aggregation.chain: index, prev_hash,
body, hash, signature) and the round the body is about. Storage is SQLite in WAL mode with
synchronous=FULL: an append that returned survives a power cut. Each log's own schema (its
triggers refuse UPDATE and DELETE, so code that tries to rewrite history fails loudly; the
chain and signatures catch whoever edits the file by other means) stays with the log
(client/outbox.py, server/ledger.py), and its record types with the chain
(aggregation/records.py); what they share is here, once:
opening, appending under one IMMEDIATE transaction, paged reading, and the auditor's
read-only reading (`read_log`).

Bodies are `canonical_json` of a record: the same bytes whoever writes them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Generic, Self, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation import chain
from fleetmind.aggregation.chain import ChainEntry

# The one canonical JSON encoder (pure, so it lives with the manifest it signs, which
# aggregation/ may not import anything to reach); every signed or hashed JSON body is it.
from fleetmind.aggregation.manifest import canonical_json

__all__ = ["COLUMNS", "LogError", "SignedLog", "canonical_json", "read_log"]

COLUMNS = "idx, prev_hash, body, hash, signature"  # what a chain entry is read from
_PAGE = 256

E = TypeVar("E", bound=ChainEntry)


class LogError(ValueError):
    """A log file cannot be read at all (missing, not SQLite, not a fleetmind log)."""


class SignedLog(Generic[E]):
    """One log file, appended to by the one process that owns it (and its signing key).
    Safe to use from several threads of that process. A subclass names its chain `DOMAIN`,
    its `SCHEMA` (a table `entries` with columns idx, round_id, prev_hash, body, hash,
    signature, in that order) and the `ENTRY` type rows are read as."""

    DOMAIN: ClassVar[bytes]
    SCHEMA: ClassVar[str]
    ENTRY: ClassVar[type[ChainEntry]] = ChainEntry

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._signing_key = signing_key
        self.public_key = signing_key.public_key()
        self._lock = threading.Lock()
        # Autocommit mode: each append is one explicit IMMEDIATE transaction.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a returned append survives power loss
        self._db.executescript(self.SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _append(self, round_id: int, body: bytes, admit: Callable[[E | None], None]) -> E:
        """Chains, signs and stores `body` after the head, in one transaction with reading
        the head. `admit(head)` raises to refuse the append (nothing is written)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                head = self._row(f"SELECT {COLUMNS} FROM entries ORDER BY idx DESC LIMIT 1")
                admit(head)
                index, prev_hash, digest, signature = chain.seal(self.DOMAIN,
                                                                 self._signing_key, head, body)
                entry = self.ENTRY(index, prev_hash, body, digest, signature)
                self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                                 (index, round_id, prev_hash, body, digest, signature))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return entry  # type: ignore[return-value]

    def entries(self, from_index: int = 0) -> Iterator[E]:
        """Entries in order from `from_index`, read a page at a time (the lock is not held
        between pages, so a slow reader never blocks an append)."""
        index = from_index
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {COLUMNS} FROM entries WHERE idx >= ? ORDER BY idx LIMIT ?",
                    (index, _PAGE)).fetchall()
            yield from (self._entry(row) for row in rows)
            if len(rows) < _PAGE:
                return
            index = rows[-1][0] + 1

    def __iter__(self) -> Iterator[E]:
        return self.entries()

    def head(self) -> E | None:
        with self._lock:
            return self._row(f"SELECT {COLUMNS} FROM entries ORDER BY idx DESC LIMIT 1")

    def _for_round(self, round_id: int) -> list[E]:
        """Every entry about `round_id`, oldest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM entries WHERE round_id = ? "
                                    "ORDER BY idx", (round_id,)).fetchall()
        return [self._entry(row) for row in rows]

    def _entry(self, row: tuple) -> E:
        return self.ENTRY(row[0], bytes(row[1]), bytes(row[2]), bytes(row[3]),  # type: ignore[return-value]
                          bytes(row[4]))

    def _row(self, query: str, args: tuple = ()) -> E | None:
        row = self._db.execute(query, args).fetchone()
        return None if row is None else self._entry(row)


def read_log(path: Path) -> list[ChainEntry]:
    """Every entry of a ledger or outbox file, in stored order, read without writing (the
    auditor's view: no signing key, nothing created). Raises LogError when the file is
    missing or is not such a log."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"{path}: no such file" if not path.exists() else
                       f"{path} is not a file")
    # mode=ro: the reader never writes an entry, creates, migrates or checkpoints the
    # owner's file (SQLite may add the -wal/-shm side files it needs to read a WAL database
    # while the owner appends). Where even those cannot be made (a read-only copy), the
    # file is read as immutable: nobody is appending to it there.
    rows = None
    for mode in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)
        except sqlite3.Error as error:
            raise LogError(f"{path}: cannot open it read-only ({error})") from None
        try:
            rows = db.execute(f"SELECT {COLUMNS} FROM entries ORDER BY idx").fetchall()
            break
        except sqlite3.OperationalError as error:
            if "no such table" in str(error) or mode == "immutable=1":
                raise LogError(f"{path} is not a fleetmind ledger or outbox ({error})") \
                    from None
        except sqlite3.DatabaseError as error:
            raise LogError(f"{path} is not a fleetmind ledger or outbox ({error})") from None
        finally:
            db.close()
    assert rows is not None
    # Types are not trusted either: a cell of the wrong type is a bad entry for the chain
    # check to name, so it becomes empty bytes rather than an exception here.
    return [ChainEntry(int(row[0]) if isinstance(row[0], int) else -1,
                       *(bytes(cell) if isinstance(cell, bytes | bytearray | memoryview)
                         else b"" for cell in row[1:]))
            for row in rows]
