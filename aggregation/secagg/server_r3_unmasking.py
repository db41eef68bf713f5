"""Round 3 at the server: rebuild the survivors' self-mask seeds and the dropped sites'
mask keys from shares, and strip those masks from the sum."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.messages import (
    DropReason,
    ProtocolError,
    RoundConfig,
    UnmaskRequest,
    UnmaskShares,
    check_round,
)
from fleetmind.aggregation.secagg.server_completed import ServerAborted, ServerCompleted
from fleetmind.aggregation.secagg.site_r2_masked_input import add_pairwise_mask, pairwise_purpose


class ServerUnmasking:
    """Send `request` to every survivor; `receive` their shares; `close`."""

    phase = "unmasking"

    def __init__(self, config: RoundConfig, request: UnmaskRequest, masked_sum: np.ndarray,
                 mask_keys: Mapping[int, bytes]) -> None:
        self.config = config
        self.request = request
        self.masked_sum = masked_sum
        self.mask_keys = dict(mask_keys)
        self.self_mask_shares: dict[int, list[crypto.Share]] = {s: [] for s in request.survivors}
        self.mask_key_shares: dict[int, list[crypto.Share]] = {s: [] for s in request.dropped}
        self.responders: set[int] = set()

    def pending(self) -> frozenset[int]:
        """Survivors that have not sent their unmask shares yet."""
        return self.request.survivors - frozenset(self.responders)

    def receive(self, message: UnmaskShares) -> None:
        config = self.config
        check_round(config.round_id, message.round_id, "unmask shares")
        site = message.site
        if site not in self.request.survivors:
            raise ProtocolError("unknown_site", f"site {site} is not a survivor of this round")
        if site in self.responders:
            raise ProtocolError("replay", f"site {site} already sent its unmask shares")
        neighbours = config.graph.neighbours[site]
        for owners, allowed, kind in ((message.self_mask_shares, self.request.survivors,
                                       "self-mask"),
                                      (message.mask_key_shares, self.request.dropped,
                                       "mask-key")):
            wrong = set(owners) - (allowed & neighbours)
            if wrong:
                raise ProtocolError("inconsistent", f"site {site} sent {kind} shares of "
                                                    f"sites {sorted(wrong)}")
            if any(share.x != site for share in owners.values()):
                raise ProtocolError("malformed", f"site {site} sent a share it does not hold")
        for owner, share in message.self_mask_shares.items():
            self.self_mask_shares[owner].append(share)
        for owner, share in message.mask_key_shares.items():
            self.mask_key_shares[owner].append(share)
        self.responders.add(site)

    def close(self) -> ServerCompleted | ServerAborted:
        config = self.config
        short = sorted(owner for owner, shares in (*self.self_mask_shares.items(),
                                                   *self.mask_key_shares.items())
                       if len(shares) < config.threshold)
        if short:
            return ServerAborted(config.round_id, self.phase,
                                 f"fewer than {config.threshold} shares for sites {short}: "
                                 "their masks cannot be removed", DropReason.TOO_FEW_SHARES)
        try:
            total = self._strip_masks()
        except crypto.CryptoError as error:
            return ServerAborted(config.round_id, self.phase, f"masks cannot be removed: "
                                                              f"{error}",
                                 DropReason.MASKS_NOT_REMOVABLE)
        return ServerCompleted(config.round_id, total, self.request.survivors,
                               self.request.dropped)

    def _strip_masks(self) -> np.ndarray:
        """The masked sum minus the survivors' self masks and the pairwise masks that
        survivors shared with dropped sites. Raises CryptoError on a corrupted share."""
        config = self.config
        total = self.masked_sum.copy()
        for shares in self.self_mask_shares.values():
            seed = crypto.combine_shares(shares, config.threshold)
            total -= crypto.expand_mask(seed, config.vector_length)
        purpose = pairwise_purpose(config.round_id)
        for owner, shares in sorted(self.mask_key_shares.items()):
            mask_key = crypto.agreement_key_from_bytes(
                crypto.combine_shares(shares, config.threshold))
            if crypto.agreement_public_bytes(mask_key) != self.mask_keys[owner]:
                raise crypto.CryptoError(f"shares of site {owner}'s mask key do not rebuild "
                                         "the advertised key: some share was corrupted")
            # Each survivor that paired with the dropped site left the pair's mask in the
            # sum with its own sign; take exactly that term back out.
            for peer in sorted(config.graph.neighbours[owner] & self.request.survivors):
                seed = crypto.agree(mask_key, self.mask_keys[peer], purpose)
                pairwise = crypto.expand_mask(seed, config.vector_length)
                add_pairwise_mask(total, owner, peer, pairwise)
        total &= np.uint32(config.ring_mask)
        return total
