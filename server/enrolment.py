"""Enrolled sites: name -> (secure-aggregation id, Ed25519 identity key), kept on disk.

A site proves it holds the key it registers by signing `enroll_signed_bytes`; the same
(name, key) always gets the same id, so enrolment is idempotent. A name or a key is never
rebound to another: a second key for a name (or a name for a key) is refused, since the
key is what neighbours verify key advertisements against.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# The proof's bytes live in aggregation/ so a site can sign them without the server;
# re-exported for the aggregator's callers.
from fleetmind.aggregation.identity_proof import (  # noqa: F401
    ENROL_DOMAIN,
    enroll_signed_bytes,
    is_small_order,
)
from fleetmind.runtime.durable import atomic_write, fsync_dir
from fleetmind.runtime.signed_log import canonical_json
from fleetmind.server.identity import SITE_NAME


class EnrolmentError(ValueError):
    """kind: malformed (bad name or key), bad_proof (the signature does not verify),
    conflict (the name or key is already bound to another)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Enrolled:
    site: int
    name: str
    identity_key: bytes


COMPACT_EVERY = 256  # log lines past which the table is rewritten whole (and the log emptied)


class Enrolments:
    """The enrolment file `path`: a JSON table {name: {site, identity_key}} rewritten
    atomically now and then, plus `path`.log, one JSON line per site enrolled since, each
    appended and fsynced before the site is answered. Rewriting and fsyncing the whole
    table on every enrolment made enrolling N sites O(N^2); the log keeps each O(1), and
    compaction (every COMPACT_EVERY lines) folds it back. Loading reads the table, then
    the log (a torn last line, from a crash mid-append, was never acknowledged: skipped).
    Lookups by site, name and key are dict lookups."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.log_path = self.path.with_name(self.path.name + ".log")
        self._lock = threading.Lock()
        self._by_name: dict[str, Enrolled] = {}
        self._by_key: dict[bytes, Enrolled] = {}
        self._by_site: dict[int, Enrolled] = {}
        if self.path.exists():
            for name, entry in json.loads(self.path.read_bytes()).items():
                self._add(Enrolled(entry["site"], name, bytes.fromhex(entry["identity_key"])))
        self._logged = 0
        if self.log_path.exists():
            raw = self.log_path.read_bytes()
            lines = raw.split(b"\n")
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    enrolled = Enrolled(entry["site"], entry["name"],
                                        bytes.fromhex(entry["identity_key"]))
                except (ValueError, KeyError, TypeError):
                    if number == len(lines) - 1:  # torn by a crash: never acknowledged
                        break
                    raise
                if self._by_name.get(enrolled.name) != enrolled:  # not already compacted
                    self._add(enrolled)
                self._logged += 1
            if not raw.endswith(b"\n") and raw:  # drop the torn tail before appending
                self._compact()
        self._next_site = max(self._by_site, default=0) + 1

    def _add(self, entry: Enrolled) -> None:
        self._by_name[entry.name] = entry
        self._by_key[entry.identity_key] = entry
        self._by_site[entry.site] = entry

    def _compact(self) -> None:
        """Rewrites the table whole (atomically, durably), then empties the log: a crash
        between the two leaves log lines the table already holds, which loading skips."""
        table = {e.name: {"site": e.site, "identity_key": e.identity_key.hex()}
                 for e in self._by_name.values()}
        atomic_write(self.path, canonical_json(table))
        if self.log_path.exists():
            os.unlink(self.log_path)
        self._logged = 0

    def _append(self, entry: Enrolled) -> None:
        """One log line, durable before it returns."""
        line = canonical_json({"name": entry.name, "site": entry.site,
                               "identity_key": entry.identity_key.hex()}) + b"\n"
        created = not self.log_path.exists()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.log_path.parent)
        self._logged += 1

    def enroll(self, site_name: str, identity_key: bytes, proof: bytes) -> Enrolled:
        if not SITE_NAME.fullmatch(site_name):
            raise EnrolmentError("malformed", f"site name {site_name!r} must be 1-63 letters, "
                                              "digits, '.', '_' or '-'")
        if len(identity_key) != 32:
            raise EnrolmentError("malformed", f"identity_key has {len(identity_key)} bytes; "
                                              "an Ed25519 public key has 32")
        if is_small_order(identity_key):
            raise EnrolmentError("malformed", "identity_key is a small-order Ed25519 point: "
                                              "it verifies forged signatures, so it proves "
                                              "nothing; generate a real key")
        try:
            Ed25519PublicKey.from_public_bytes(identity_key).verify(
                proof, enroll_signed_bytes(site_name, identity_key))
        except (InvalidSignature, ValueError):
            raise EnrolmentError("bad_proof", f"proof for {site_name!r} does not verify with the "
                                              "key it registers: sign enroll_signed_bytes with "
                                              "that key") from None
        with self._lock:
            known = self._by_name.get(site_name)
            if known is not None:
                if known.identity_key != identity_key:
                    raise EnrolmentError("conflict", f"site {site_name!r} is enrolled with "
                                                     "another identity key; a site keeps its "
                                                     "key (enrol a new name to start afresh)")
                return known
            if identity_key in self._by_key:
                raise EnrolmentError("conflict", "this identity key is enrolled under another "
                                                 "site name")
            entry = Enrolled(self._next_site, site_name, identity_key)
            self._append(entry)  # durable before it is answered
            self._add(entry)
            self._next_site += 1
            if self._logged >= COMPACT_EVERY:
                self._compact()
            return entry

    def get(self, site: int) -> Enrolled | None:
        with self._lock:
            return self._by_site.get(site)

    def identities(self, sites: list[int]) -> dict[int, bytes]:
        with self._lock:
            return {site: self._by_site[site].identity_key for site in sites}

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_site)
