"""Round 0 at the server: collect the sites' signed key advertisements."""

from __future__ import annotations

from fleetmind.aggregation.secagg.messages import (
    DropReason,
    KeyAdvertisement,
    ProtocolError,
    RoundConfig,
    check_round,
)
from fleetmind.aggregation.secagg.server_completed import ServerAborted
from fleetmind.aggregation.secagg.server_r1_share_keys import ServerShareKeys


class ServerAdvertiseKeys:
    """`receive` each site's advertisement; `close` at the deadline."""

    phase = "advertise_keys"

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self.advertisements: dict[int, KeyAdvertisement] = {}

    def pending(self) -> frozenset[int]:
        """Cohort sites that have not advertised keys yet."""
        return frozenset(self.config.graph.sites) - frozenset(self.advertisements)

    def receive(self, advertisement: KeyAdvertisement) -> None:
        check_round(self.config.round_id, advertisement.round_id, "key advertisement")
        site = advertisement.site
        if site not in self.config.graph.sites:
            raise ProtocolError("unknown_site", f"site {site} is not in round "
                                                f"{self.config.round_id}'s cohort")
        if site in self.advertisements:
            raise ProtocolError("replay", f"site {site} already advertised its keys")
        advertisement.verify(self.config.identities[site])
        self.advertisements[site] = advertisement

    def close(self) -> ServerShareKeys | ServerAborted:
        if len(self.advertisements) < self.config.min_cohort:
            return ServerAborted(self.config.round_id, self.phase,
                                 f"{len(self.advertisements)} sites advertised keys, minimum "
                                 f"cohort {self.config.min_cohort}",
                                 DropReason.BELOW_MIN_COHORT)
        return ServerShareKeys(self.config, self.advertisements)
