"""Round 2 at a site: add the self mask and the pairwise masks to the ring vector."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.messages import MaskedInput, Neighbourhood, ProtocolError
from fleetmind.aggregation.secagg.site_r3_unmasking import SiteUnmasking


@dataclass(frozen=True)
class HeldShares:
    """The two shares a neighbour gave this site: of its self-mask seed and its mask key."""

    self_mask: crypto.Share
    mask_key: crypto.Share


def pairwise_purpose(round_id: int) -> bytes:
    return b"pairwise-mask" + struct.pack("<Q", round_id)


def add_pairwise_mask(vector: np.ndarray, site: int, peer: int, mask: np.ndarray) -> None:
    """In place: the lower id adds the pair's mask and the higher subtracts it, so the
    pair's masks cancel in the sum (uint32 arithmetic wraps, which is arithmetic mod 2^32)."""
    if site < peer:
        vector += mask
    else:
        vector -= mask


class SiteMaskedInput:
    """Call `mask` once with this site's ring vector."""

    def __init__(self, config: Neighbourhood, site: int, mask_key: X25519PrivateKey,
                 self_mask_seed: bytes, partners: Mapping[int, bytes],
                 held: Mapping[int, HeldShares]) -> None:
        self.config = config
        self.site = site
        self._mask_key = mask_key
        self._self_mask_seed: bytes | None = self_mask_seed
        self._partners = dict(partners)  # neighbour -> its X25519 mask public key
        self._held = dict(held)

    def mask(self, ring_vector: np.ndarray) -> tuple[MaskedInput, SiteUnmasking]:
        config = self.config
        if self._self_mask_seed is None:
            # The same masks on two inputs would reveal their difference.
            raise ProtocolError("replay", f"site {self.site} already sent its masked input")
        if ring_vector.dtype != np.uint32 or ring_vector.shape != (config.vector_length,):
            raise ValueError(f"ring_vector must be uint32 of shape ({config.vector_length},), "
                             f"got {ring_vector.dtype} {ring_vector.shape}")
        if int(ring_vector.max(initial=0)) > config.ring_mask:
            raise ValueError(f"ring_vector has words >= 2^{config.ring_bits}")
        masked = ring_vector.copy()
        masked += crypto.expand_mask(self._self_mask_seed, config.vector_length)
        purpose = pairwise_purpose(config.round_id)
        for peer, peer_mask_key in sorted(self._partners.items()):
            seed = crypto.agree(self._mask_key, peer_mask_key, purpose)
            add_pairwise_mask(masked, self.site, peer,
                              crypto.expand_mask(seed, config.vector_length))
        masked &= np.uint32(config.ring_mask)
        self._self_mask_seed = None
        return (MaskedInput(config.round_id, self.site, masked),
                SiteUnmasking(config, self.site, self._held))
