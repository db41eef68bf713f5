"""Round 1 at the server: route the encrypted shares; it cannot open them."""

from __future__ import annotations

from collections.abc import Mapping

from fleetmind.aggregation.secagg.messages import (
    AdvertisedKeys,
    DropReason,
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    ProtocolError,
    RoundConfig,
    SharesForSite,
    check_round,
)
from fleetmind.aggregation.secagg.server_completed import ServerAborted
from fleetmind.aggregation.secagg.server_r2_masked_input_collection import (
    ServerMaskedInputCollection,
)


class ServerShareKeys:
    """Send `to_sites` (each site's neighbours' keys); `receive` shares; `close`."""

    phase = "share_keys"

    def __init__(self, config: RoundConfig, advertisements: Mapping[int, KeyAdvertisement]) -> None:
        self.config = config
        self.mask_keys = {site: ad.mask_key for site, ad in advertisements.items()}
        advertised = set(advertisements)
        self.to_sites = {
            site: AdvertisedKeys(config.round_id, tuple(
                advertisements[peer]
                for peer in sorted(config.graph.neighbours[site] & advertised)))
            for site in sorted(advertised)}
        self.shares: dict[int, EncryptedShares] = {}

    def pending(self) -> frozenset[int]:
        """Sites that advertised keys and have not sent their shares yet."""
        return frozenset(self.to_sites) - frozenset(self.shares)

    def receive(self, message: EncryptedShares) -> None:
        config = self.config
        check_round(config.round_id, message.round_id, "encrypted shares")
        sender = message.sender
        if sender not in self.to_sites:
            raise ProtocolError("unknown_site", f"site {sender} did not advertise keys")
        if sender in self.shares:
            raise ProtocolError("replay", f"site {sender} already sent its shares")
        expected = {ad.site for ad in self.to_sites[sender].advertisements}
        recipients = [share.recipient for share in message.shares]
        if any(share.sender != sender for share in message.shares):
            raise ProtocolError("malformed", f"site {sender} sent a share in another's name")
        if len(set(recipients)) != len(recipients) or set(recipients) != expected:
            raise ProtocolError("malformed", f"site {sender} must send one share to each of "
                                             f"{sorted(expected)}, sent to {sorted(recipients)}")
        self.shares[sender] = message

    def close(self) -> ServerMaskedInputCollection | ServerAborted:
        config = self.config
        shared = frozenset(self.shares)
        if len(shared) < config.min_cohort:
            return ServerAborted(config.round_id, self.phase,
                                 f"{len(shared)} sites shared keys, minimum cohort "
                                 f"{config.min_cohort}", DropReason.BELOW_MIN_COHORT)
        inbox: dict[int, list[EncryptedShare]] = {site: [] for site in shared}
        for message in self.shares.values():
            for share in message.shares:
                if share.recipient in shared:
                    inbox[share.recipient].append(share)
        to_sites = {site: SharesForSite(config.round_id, site, tuple(shares))
                    for site, shares in sorted(inbox.items())}
        return ServerMaskedInputCollection(
            config, {site: self.mask_keys[site] for site in shared}, to_sites)
