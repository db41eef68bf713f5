"""Enrolled sites: name -> (secure-aggregation id, Ed25519 identity key), kept on disk.

A site proves it holds the key it registers by signing `enroll_signed_bytes`; the same
(name, key) always gets the same id, so enrolment is idempotent. A name or a key is never
rebound to another: a second key for a name (or a name for a key) is refused, since the
key is what neighbours verify key advertisements against.
"""

from __future__ import annotations

import json
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
from fleetmind.runtime.durable import atomic_write
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


class Enrolments:
    """The enrolment file `path` (JSON, rewritten atomically on each new site)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._by_name: dict[str, Enrolled] = {}
        if self.path.exists():
            for name, entry in json.loads(self.path.read_bytes()).items():
                self._by_name[name] = Enrolled(entry["site"], name,
                                               bytes.fromhex(entry["identity_key"]))
        self._by_site = {e.site: e for e in self._by_name.values()}

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
            if any(e.identity_key == identity_key for e in self._by_name.values()):
                raise EnrolmentError("conflict", "this identity key is enrolled under another "
                                                 "site name")
            entry = Enrolled(max(self._by_site, default=0) + 1, site_name, identity_key)
            table = {e.name: {"site": e.site, "identity_key": e.identity_key.hex()}
                     for e in (*self._by_name.values(), entry)}
            atomic_write(self.path, canonical_json(table))  # durable before it is answered
            self._by_name[site_name] = entry
            self._by_site[entry.site] = entry
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
