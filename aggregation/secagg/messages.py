"""The protocol's configuration, messages and refusals: small frozen dataclasses, no transport.

The gRPC layer carries these; `wire_bytes` gives each message's payload size (fields as
they would be packed: 4-byte ids, raw keys and ciphertexts, ring words packed to
`ring_bits`), which the benchmark sums as bytes on the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Literal

import numpy as np

from fleetmind.aggregation.quantize import RING_BITS
from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.graph import NeighbourGraph

RefusalKind = Literal["wrong_round", "unknown_site", "replay", "bad_signature", "malformed",
                      "below_threshold", "inconsistent"]


class ProtocolError(ValueError):
    """A message was refused, or the round cannot go on. `kind` maps to a gRPC status:
    wrong_round/below_threshold/inconsistent -> FAILED_PRECONDITION, unknown_site ->
    PERMISSION_DENIED, replay -> ALREADY_EXISTS, bad_signature -> UNAUTHENTICATED,
    malformed -> INVALID_ARGUMENT. A refused message changes no state."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RoundPhase(StrEnum):
    """Where a round was when a site left it or it ended (fleet.proto RoundPhase). The
    values are the server states' `phase` names, so a state's phase compares equal to its
    member; COHORT is before the protocol (queued, the cohort forming) and MERGE after it
    (the unmasked sum checked, merged and published)."""

    COHORT = "cohort"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT_COLLECTION = "masked_input_collection"
    UNMASKING = "unmasking"
    MERGE = "merge"


class DropReason(Enum):
    """Why a site left a round, or the round ended without a sum (fcp's ClientDropReason;
    fleet.proto DropReason). The protocol states set BELOW_MIN_COHORT, TOO_FEW_SHARES and
    MASKS_NOT_REMOVABLE (ServerAborted); the coordinator the rest."""

    MISSED_DEADLINE = "missed_deadline"  # this site did not answer the phase in time
    BELOW_MIN_COHORT = "below_min_cohort"  # too few sites answered a phase: no sum
    TOO_FEW_SHARES = "too_few_shares"  # a site's masks lack the threshold of shares
    MASKS_NOT_REMOVABLE = "masks_not_removable"  # shares do not rebuild a mask (corrupted)
    UPDATE_REJECTED = "update_rejected"  # the unmasked sum failed the aggregate check
    MERGE_FAILED = "merge_failed"  # the sum could not be decoded or merged
    ABANDONED_AT_RESTART = "abandoned_at_restart"  # the aggregator restarted mid-round
    QUEUE_REFUSED = "queue_refused"  # the cohort was refused before it ran (the budget)
    COHORT_WAIT_EXPIRED = "cohort_wait_expired"  # queued too long for a cohort to form


def check_round(expected: int, got: int, what: str) -> None:
    if got != expected:
        raise ProtocolError("wrong_round", f"{what} is for round {got}, this is round "
                                           f"{expected}")


def _check_round_fields(round_id: int, ring_bits: int, vector_length: int, min_cohort: int,
                        cohort_size: int) -> None:
    """What every view of a round must hold, the whole config's and a site's alike."""
    if round_id < 0:
        raise ValueError(f"round_id={round_id} must be >= 0")
    if ring_bits not in RING_BITS:
        raise ValueError(f"ring_bits={ring_bits} must be one of {RING_BITS}")
    if vector_length < 1:
        raise ValueError(f"vector_length={vector_length} must be >= 1")
    if not 2 <= min_cohort <= cohort_size:
        raise ValueError(f"min_cohort={min_cohort} must be in 2..cohort size {cohort_size}: "
                         "a sum of one site is that site")


@dataclass(frozen=True)
class RoundConfig:
    """What every party knows before a round starts.

    threshold: shares of a site's secret needed to rebuild it (t of its k neighbours).
    min_cohort: the server refuses to unmask a sum of fewer sites than this.
    identities: site id -> Ed25519 public key, from enrolment; sites verify their
    neighbours' key advertisements against it.
    """

    round_id: int
    graph: NeighbourGraph
    threshold: int
    min_cohort: int
    vector_length: int
    ring_bits: int
    identities: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "identities", MappingProxyType(dict(self.identities)))
        _check_round_fields(self.round_id, self.ring_bits, self.vector_length,
                            self.min_cohort, len(self.graph.sites))
        if set(self.identities) != set(self.graph.sites):
            raise ValueError("identities and graph name different sites: "
                             f"{sorted(set(self.identities) ^ set(self.graph.sites))}")
        if not 2 <= self.threshold <= self.graph.min_degree:
            raise ValueError(f"threshold={self.threshold} must be in 2..{self.graph.min_degree}"
                             " (the smallest neighbourhood)")

    @property
    def ring_mask(self) -> int:
        return (1 << self.ring_bits) - 1

    def neighbourhood(self, site: int) -> Neighbourhood:
        """What `site` is told of the round: its neighbours and their keys, not the cohort's
        graph (O(k) a site instead of O(n): docs/scale.md, "Where the time goes", item 1)."""
        if site not in self.graph.sites:
            raise ValueError(f"site {site} is not in round {self.round_id}'s cohort")
        peers = self.graph.neighbours[site]
        return Neighbourhood(self.round_id, site, peers, self.threshold, self.min_cohort,
                             len(self.graph.sites), self.vector_length, self.ring_bits,
                             {s: self.identities[s] for s in peers | {site}})


@dataclass(frozen=True)
class Neighbourhood:
    """One site's view of a round (SecAgg+ needs no more: a site masks with, shares to and
    verifies only its neighbours). identities: the site's and its neighbours' Ed25519 keys."""

    round_id: int
    site: int
    neighbours: frozenset[int]
    threshold: int
    min_cohort: int
    cohort_size: int
    vector_length: int
    ring_bits: int
    identities: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "neighbours", frozenset(self.neighbours))
        object.__setattr__(self, "identities", MappingProxyType(dict(self.identities)))
        if not len(self.neighbours) < self.cohort_size:
            raise ValueError(f"cohort_size={self.cohort_size} must exceed the site's "
                             f"{len(self.neighbours)} neighbours")
        _check_round_fields(self.round_id, self.ring_bits, self.vector_length,
                            self.min_cohort, self.cohort_size)
        if min(self.neighbours | {self.site}) < 1:
            raise ValueError("site ids must be >= 1 (they are Shamir x-coordinates)")
        if self.site in self.neighbours:
            raise ValueError(f"site {self.site} lists itself as a neighbour")
        if set(self.identities) != self.neighbours | {self.site}:
            raise ValueError("identities must name the site and its neighbours exactly: "
                             f"{sorted(set(self.identities) ^ (self.neighbours | {self.site}))}")
        if not 2 <= self.threshold <= len(self.neighbours):
            raise ValueError(f"threshold={self.threshold} must be in 2..{len(self.neighbours)}"
                             " (this site's neighbours)")

    @property
    def ring_mask(self) -> int:
        return (1 << self.ring_bits) - 1

    def neighbourhood(self, site: int) -> Neighbourhood:
        """Itself, for `site`: a site's states accept a round's whole config or its view."""
        if site != self.site:
            raise ValueError(f"site {site} is not in round {self.round_id}'s cohort as this "
                             f"site sees it (site {self.site}'s neighbourhood)")
        return self


@dataclass(frozen=True)
class KeyAdvertisement:
    """Round 0, site -> server -> neighbours: two X25519 public keys, signed by the site's
    Ed25519 identity so the server cannot substitute its own (man in the middle)."""

    round_id: int
    site: int
    mask_key: bytes  # pairwise masks are agreed on this key
    share_key: bytes  # shares in transit are encrypted under this key
    signature: bytes

    def __post_init__(self) -> None:
        for name in ("mask_key", "share_key"):
            if len(getattr(self, name)) != crypto.PUBLIC_KEY_BYTES:
                raise ProtocolError("malformed", f"{name} must be {crypto.PUBLIC_KEY_BYTES} "
                                                 f"bytes, got {len(getattr(self, name))}")
        if self.mask_key == self.share_key:
            raise ProtocolError("malformed", "mask_key and share_key must differ")

    @staticmethod
    def signed_bytes(round_id: int, site: int, mask_key: bytes, share_key: bytes) -> bytes:
        return b"fleetmind/secagg/advertise" + struct.pack("<QI", round_id, site) \
            + mask_key + share_key

    def verify(self, identity_public: bytes) -> None:
        try:
            crypto.verify(identity_public, self.signed_bytes(
                self.round_id, self.site, self.mask_key, self.share_key), self.signature)
        except crypto.CryptoError as error:
            raise ProtocolError("bad_signature", f"site {self.site}: {error}") from None

    def wire_bytes(self) -> int:
        return 12 + 2 * crypto.PUBLIC_KEY_BYTES + len(self.signature)


@dataclass(frozen=True)
class AdvertisedKeys:
    """Round 0 result, server -> one site: its neighbours' advertisements."""

    round_id: int
    advertisements: tuple[KeyAdvertisement, ...]

    def wire_bytes(self) -> int:
        return 8 + sum(ad.wire_bytes() for ad in self.advertisements)


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of the sender's two shares (self-mask seed, mask key) for one
    recipient; only the recipient can open it."""

    sender: int
    recipient: int
    ciphertext: bytes

    @staticmethod
    def associated_data(round_id: int, sender: int, recipient: int) -> bytes:
        # Binding round and both ids stops replay across rounds and redirection.
        return b"fleetmind/secagg/share" + struct.pack("<QII", round_id, sender, recipient)

    def wire_bytes(self) -> int:
        return 8 + len(self.ciphertext)


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1, site -> server: one ciphertext per neighbour."""

    round_id: int
    sender: int
    shares: tuple[EncryptedShare, ...]

    def wire_bytes(self) -> int:
        return 12 + sum(share.wire_bytes() for share in self.shares)


@dataclass(frozen=True)
class SharesForSite:
    """Round 1 result, server -> one site: the ciphertexts addressed to it."""

    round_id: int
    recipient: int
    shares: tuple[EncryptedShare, ...]

    def wire_bytes(self) -> int:
        return 12 + sum(share.wire_bytes() for share in self.shares)


def pack_ring(vector: np.ndarray, ring_bits: int) -> bytes:
    """Ring words as ring_bits/8 little-endian bytes each."""
    width = ring_bits // 8
    words = np.ascontiguousarray(vector, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return words[:, :width].tobytes()


def unpack_ring(packed: bytes, ring_bits: int) -> np.ndarray:
    width = ring_bits // 8
    if len(packed) % width:
        raise ProtocolError("malformed", f"{len(packed)} bytes is not a whole number of "
                                         f"{ring_bits}-bit words")
    words = np.zeros((len(packed) // width, 4), dtype=np.uint8)
    words[:, :width] = np.frombuffer(packed, dtype=np.uint8).reshape(-1, width)
    return words.view("<u4").reshape(-1)


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, site -> server: the site's ring vector plus its masks. Alone it is uniform
    noise; only the cohort sum, after unmasking, means anything."""

    round_id: int
    site: int
    masked_vector: np.ndarray  # uint32 words, each < 2^ring_bits

    def __post_init__(self) -> None:
        vector = self.masked_vector
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1:
            raise ProtocolError("malformed", f"site {self.site}: masked_vector must be a 1-D "
                                             "uint32 array")
        vector.flags.writeable = False

    def wire_bytes(self, ring_bits: int) -> int:
        return 12 + self.masked_vector.size * ring_bits // 8


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> survivors: who sent a masked vector (their self masks come off)
    and who dropped after sharing keys (their pairwise masks come off)."""

    round_id: int
    survivors: frozenset[int]
    dropped: frozenset[int]

    def wire_bytes(self) -> int:
        return 8 + 4 * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskShares:
    """Round 3, site -> server: for each neighbour, one share and never both kinds:
    a self-mask share if it survived, a mask-key share if it dropped."""

    round_id: int
    site: int
    self_mask_shares: Mapping[int, crypto.Share]  # owner -> share of the owner's seed
    mask_key_shares: Mapping[int, crypto.Share]  # owner -> share of its X25519 mask key

    def __post_init__(self) -> None:
        object.__setattr__(self, "self_mask_shares", MappingProxyType(dict(self.self_mask_shares)))
        object.__setattr__(self, "mask_key_shares", MappingProxyType(dict(self.mask_key_shares)))
        both = set(self.self_mask_shares) & set(self.mask_key_shares)
        if both:
            raise ProtocolError("inconsistent", f"site {self.site} offers both shares of "
                                                f"sites {sorted(both)}")

    def wire_bytes(self) -> int:
        count = len(self.self_mask_shares) + len(self.mask_key_shares)
        return 12 + count * (4 + 4 + crypto.SHARE_VALUE_BYTES)
