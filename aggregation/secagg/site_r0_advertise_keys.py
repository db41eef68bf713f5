"""Round 0 at a site: make this round's two X25519 keys and advertise them, signed."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.messages import (
    AdvertisedKeys,
    KeyAdvertisement,
    Neighbourhood,
    ProtocolError,
    RoundConfig,
    check_round,
)
from fleetmind.aggregation.secagg.site_r1_share_keys import SiteShareKeys


class SiteAdvertiseKeys:
    """Send `advertisement`; pass the server's reply to `receive`."""

    def __init__(self, round_config: RoundConfig | Neighbourhood, site: int,
                 identity: Ed25519PrivateKey) -> None:
        config = round_config.neighbourhood(site)  # ValueError if site is not in the cohort
        if crypto.identity_public_bytes(identity) != config.identities[site]:
            raise ValueError(f"identity key of site {site} does not match its enrolment")
        self.config = config
        self.site = site
        # Fresh keys every round: a key pair never masks two rounds.
        self.keys = crypto.RoundKeys.new()
        mask_public = crypto.agreement_public_bytes(self.keys.mask)
        share_public = crypto.agreement_public_bytes(self.keys.share)
        signature = crypto.sign(identity, KeyAdvertisement.signed_bytes(
            config.round_id, site, mask_public, share_public))
        self.advertisement = KeyAdvertisement(config.round_id, site, mask_public, share_public,
                                              signature)

    @classmethod
    def resume(cls, config: Neighbourhood, site: int, keys: crypto.RoundKeys,
               advertisement: KeyAdvertisement) -> SiteAdvertiseKeys:
        """The state as `__init__` left it, for a site that keeps its round between processes
        (a Flower node): no key is made or signed again."""
        state = cls.__new__(cls)
        state.config, state.site, state.keys, state.advertisement = (config, site, keys,
                                                                     advertisement)
        return state

    def receive(self, keys: AdvertisedKeys) -> SiteShareKeys:
        """Verify every neighbour's signed keys, then share this site's secrets with them."""
        config = self.config
        check_round(config.round_id, keys.round_id, "advertised keys")
        neighbours = config.neighbours
        peers: dict[int, KeyAdvertisement] = {}
        for advertisement in keys.advertisements:
            check_round(config.round_id, advertisement.round_id,
                        f"advertisement of site {advertisement.site}")
            if advertisement.site not in neighbours:
                raise ProtocolError("unknown_site", f"site {advertisement.site} is not a "
                                                    f"neighbour of site {self.site}")
            if advertisement.site in peers:
                raise ProtocolError("replay", f"site {advertisement.site} advertised twice")
            advertisement.verify(config.identities[advertisement.site])
            peers[advertisement.site] = advertisement
        public_keys = [key for ad in peers.values() for key in (ad.mask_key, ad.share_key)]
        public_keys += [self.advertisement.mask_key, self.advertisement.share_key]
        if len(set(public_keys)) != len(public_keys):
            raise ProtocolError("inconsistent", "two advertisements carry the same key")
        if len(peers) < config.threshold:
            raise ProtocolError("below_threshold", f"site {self.site} has {len(peers)} live "
                                                   f"neighbours, threshold {config.threshold}")
        return SiteShareKeys(config, self.site, self.keys, peers)
