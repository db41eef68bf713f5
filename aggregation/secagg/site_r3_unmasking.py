"""Round 3 at a site: help remove the masks, giving one kind of share per neighbour."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fleetmind.aggregation.secagg.messages import (
    Neighbourhood,
    ProtocolError,
    UnmaskRequest,
    UnmaskShares,
    check_round,
)

if TYPE_CHECKING:
    from fleetmind.aggregation.secagg.site_r2_masked_input import HeldShares


class SiteUnmasking:
    """Call `respond` once with the server's unmask request."""

    def __init__(self, config: Neighbourhood, site: int, held: Mapping[int, HeldShares]) -> None:
        self.config = config
        self.site = site
        self.held = dict(held)  # neighbour -> the two shares it gave this site
        self.answered = False

    def respond(self, request: UnmaskRequest) -> UnmaskShares:
        """Self-mask shares of survivors, mask-key shares of the dropped; never both for one
        site, since the two together would expose that site's own vector."""
        config = self.config
        check_round(config.round_id, request.round_id, "unmask request")
        if self.answered:
            raise ProtocolError("replay", f"site {self.site} already answered the unmask "
                                          "request")
        if request.survivors & request.dropped:
            raise ProtocolError("inconsistent", "sites listed both as survivors and dropped: "
                                                f"{sorted(request.survivors & request.dropped)}")
        if self.site not in request.survivors:
            raise ProtocolError("inconsistent", f"site {self.site} sent its masked input but "
                                                "is not listed as a survivor")
        if len(request.survivors) < config.min_cohort:
            raise ProtocolError("below_threshold", f"{len(request.survivors)} survivors, "
                                                   f"below the minimum cohort "
                                                   f"{config.min_cohort}: refusing to unmask")
        unaccounted = set(self.held) - request.survivors - request.dropped
        if unaccounted:
            raise ProtocolError("inconsistent", f"sites {sorted(unaccounted)} shared keys but "
                                                "are neither survivors nor dropped")
        self.answered = True
        return UnmaskShares(
            config.round_id, self.site,
            self_mask_shares={owner: shares.self_mask for owner, shares in self.held.items()
                              if owner in request.survivors},
            mask_key_shares={owner: shares.mask_key for owner, shares in self.held.items()
                             if owner in request.dropped})
