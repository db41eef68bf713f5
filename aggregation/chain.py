"""Hash-chained, Ed25519-signed logs: the pure part, shared by the aggregator's ledger
(fleetmind.server.ledger), the site's outbox (fleetmind.client.outbox) and the auditor.

Entry i's hash is

    sha256(domain || uint64-le(i) || hash of entry i-1 || body)

with 32 zero bytes (GENESIS_HASH) before entry 0; the log owner's Ed25519 key signs the
hash. `domain` is different for each kind of log, so an entry lifted from one log never
verifies in another. An auditor holding the public key finds any edited, reordered,
removed or forged entry (`verify_chain`, which names the first bad one); cutting entries
off the END leaves a shorter valid chain, which only a head kept from before
(`expected_head`) reveals.

No file I/O here: what a body is (canonical JSON of a record) and what must hold between
consecutive bodies is fleetmind.aggregation.records'; storage belongs to the ledger and the
outbox.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

GENESIS_HASH = bytes(32)

T = TypeVar("T")

# check(body, what the previous entry's check returned or None for entry 0) -> what to
# hand the next entry's check. Raises ValueError (or TypeError) saying what is wrong.
BodyCheck = Callable[[bytes, T | None], T]


class ChainError(ValueError):
    """The chain is broken at `index` (its position in the sequence checked), or an append
    or check of the whole chain was refused (index None). `detail` is the message without
    the entry prefix, so a log can re-raise it as its own error type."""

    label = "chain entry"

    def __init__(self, index: int | None, message: str) -> None:
        super().__init__(message if index is None else f"{self.label} {index}: {message}")
        self.index = index
        self.detail = message


@dataclass(frozen=True)
class ChainEntry:
    """One chained, signed entry, as stored and as carried on the wire."""

    index: int
    prev_hash: bytes
    body: bytes
    hash: bytes
    signature: bytes


def entry_hash(domain: bytes, index: int, prev_hash: bytes, body: bytes) -> bytes:
    """The hash entry `index` must carry; the index is fixed-width so that no two
    (index, prev_hash, body) triples share a preimage."""
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    if len(prev_hash) != 32:
        raise ValueError(f"prev_hash is {len(prev_hash)} bytes: a sha256 is 32")
    return hashlib.sha256(domain + index.to_bytes(8, "little") + prev_hash + body).digest()


def seal(domain: bytes, signing_key: Ed25519PrivateKey, head: ChainEntry | None,
         body: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(index, prev_hash, hash, signature) for `body` appended after `head` (None: the
    chain is empty). The caller stores them as one entry, atomically with reading `head`."""
    index = 0 if head is None else head.index + 1
    prev_hash = GENESIS_HASH if head is None else head.hash
    digest = entry_hash(domain, index, prev_hash, body)
    return index, prev_hash, digest, signing_key.sign(digest)


def public_key(key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    """Accepts the key object or its 32 raw bytes (as auditors are usually handed it)."""
    return key if isinstance(key, Ed25519PublicKey) else Ed25519PublicKey.from_public_bytes(key)


def verify_chain(entries: Iterable[ChainEntry], key: Ed25519PublicKey | bytes, *,
                 domain: bytes, expected_head: bytes | None = None,
                 check: BodyCheck[Any] | None = None, signer: str = "the signing key",
                 error: type[ChainError] = ChainError) -> bytes:
    """Checks every entry in order and returns the head hash (GENESIS_HASH when empty).

    Raises `error` naming the first entry that is out of place, altered, unsigned, or that
    `check` refuses (its ValueError/TypeError message becomes the detail). With
    `expected_head` (a head hash the auditor kept from an earlier check), a chain that no
    longer contains it was cut short. `signer` names the key in the signature message."""
    verifier = public_key(key)
    previous = GENESIS_HASH
    state = None
    seen_head = expected_head is None or expected_head == GENESIS_HASH
    for position, entry in enumerate(entries):
        if entry.index != position:
            raise error(position, f"says it is entry {entry.index}: entries were "
                                  "removed, inserted or reordered")
        if entry.prev_hash != previous:
            raise error(position, "does not follow the entry before it (prev_hash "
                                  "differs): an earlier entry was removed or replaced")
        if entry.hash != entry_hash(domain, entry.index, entry.prev_hash, entry.body):
            raise error(position, "hash does not match its contents: the entry was altered")
        try:
            verifier.verify(entry.signature, entry.hash)
        except InvalidSignature:
            raise error(position, f"signature does not verify with {signer}") from None
        if check is not None:
            try:
                state = check(entry.body, state)
            except (ValueError, TypeError) as problem:
                raise error(position, str(problem)) from None
        previous = entry.hash
        seen_head = seen_head or entry.hash == expected_head
    if not seen_head:
        raise error(None, "the chain does not contain the head you kept: entries were "
                          "cut off its end, or it is another log")
    return previous
