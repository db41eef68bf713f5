"""Round 1 at a site: Shamir-share the self-mask seed and the mask key among neighbours,
each pair of shares encrypted for its holder; then open the shares others sent here."""

from __future__ import annotations

import struct
from collections.abc import Mapping

from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.messages import (
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    Neighbourhood,
    ProtocolError,
    SharesForSite,
    check_round,
)
from fleetmind.aggregation.secagg.site_r2_masked_input import HeldShares, SiteMaskedInput


def transport_purpose(round_id: int) -> bytes:
    return b"share-transport" + struct.pack("<Q", round_id)


class SiteShareKeys:
    """Send `encrypted_shares`; pass the shares the server forwards here to `receive`."""

    def __init__(self, config: Neighbourhood, site: int, keys: crypto.RoundKeys,
                 peers: Mapping[int, KeyAdvertisement]) -> None:
        self._keep(config, site, keys, peers, crypto.random_seed())
        holders = sorted(peers)
        seed_shares = crypto.split_secret(self.self_mask_seed, config.threshold, holders)
        key_shares = crypto.split_secret(crypto.agreement_private_bytes(keys.mask),
                                         config.threshold, holders)
        shares = []
        for holder in holders:
            plaintext = (seed_shares[holder].y.to_bytes(crypto.SHARE_VALUE_BYTES, "little")
                         + key_shares[holder].y.to_bytes(crypto.SHARE_VALUE_BYTES, "little"))
            associated = EncryptedShare.associated_data(config.round_id, site, holder)
            shares.append(EncryptedShare(site, holder, crypto.encrypt(
                self._transport_keys[holder], plaintext, associated)))
        self.encrypted_shares = EncryptedShares(config.round_id, site, tuple(shares))

    @classmethod
    def resume(cls, config: Neighbourhood, site: int, keys: crypto.RoundKeys,
               peers: Mapping[int, KeyAdvertisement], self_mask_seed: bytes) -> SiteShareKeys:
        """The state after its shares were sent, for a site that keeps its round between
        processes (a Flower node): ready to `receive`; nothing is drawn or shared again."""
        state = cls.__new__(cls)
        state._keep(config, site, keys, peers, self_mask_seed)
        return state

    def _keep(self, config: Neighbourhood, site: int, keys: crypto.RoundKeys,
              peers: Mapping[int, KeyAdvertisement], self_mask_seed: bytes) -> None:
        self.config, self.site, self.keys = config, site, keys
        self.peers = dict(peers)  # the neighbours whose signed keys were verified
        self.self_mask_seed = self_mask_seed
        purpose = transport_purpose(config.round_id)
        self._transport_keys = {peer: crypto.agree(keys.share, ad.share_key, purpose)
                                for peer, ad in peers.items()}

    def receive(self, bundle: SharesForSite) -> SiteMaskedInput:
        """Open and keep the neighbours' shares; they decide whom this site masks with."""
        config = self.config
        check_round(config.round_id, bundle.round_id, "shares")
        if bundle.recipient != self.site:
            raise ProtocolError("malformed", f"shares for site {bundle.recipient} delivered "
                                             f"to site {self.site}")
        held: dict[int, HeldShares] = {}
        for share in bundle.shares:
            if share.recipient != self.site:
                raise ProtocolError("malformed", f"a share for site {share.recipient} "
                                                 f"delivered to site {self.site}")
            if share.sender not in self.peers:
                raise ProtocolError("unknown_site", f"share from site {share.sender}, which "
                                                    f"did not advertise to site {self.site}")
            if share.sender in held:
                raise ProtocolError("replay", f"second share from site {share.sender}")
            try:
                plaintext = crypto.decrypt(
                    self._transport_keys[share.sender], share.ciphertext,
                    EncryptedShare.associated_data(config.round_id, share.sender, self.site))
            except crypto.CryptoError as error:
                raise ProtocolError("bad_signature", f"share from site {share.sender}: "
                                                     f"{error}") from None
            if len(plaintext) != 2 * crypto.SHARE_VALUE_BYTES:
                raise ProtocolError("malformed", f"share from site {share.sender} has "
                                                 f"{len(plaintext)} bytes")
            half = crypto.SHARE_VALUE_BYTES
            held[share.sender] = HeldShares(
                self_mask=crypto.Share(self.site, int.from_bytes(plaintext[:half], "little")),
                mask_key=crypto.Share(self.site, int.from_bytes(plaintext[half:], "little")))
        if len(held) < config.threshold:
            raise ProtocolError("below_threshold", f"site {self.site} got shares from "
                                                   f"{len(held)} neighbours, threshold "
                                                   f"{config.threshold}")
        partners = {peer: self.peers[peer].mask_key for peer in held}
        return SiteMaskedInput(config, self.site, self.keys.mask, self.self_mask_seed,
                               partners, held)
