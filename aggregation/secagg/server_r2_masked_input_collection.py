"""Round 2 at the server: add each masked vector into one running sum.

Only the running sum is kept: no individual vector, masked or not, stays in server state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fleetmind.aggregation.secagg.messages import (
    DropReason,
    MaskedInput,
    ProtocolError,
    RoundConfig,
    SharesForSite,
    UnmaskRequest,
    check_round,
)
from fleetmind.aggregation.secagg.server_completed import ServerAborted
from fleetmind.aggregation.secagg.server_r3_unmasking import ServerUnmasking


class ServerMaskedInputCollection:
    """Send `to_sites` (the shares addressed to each); `receive` masked inputs; `close`."""

    phase = "masked_input_collection"

    def __init__(self, config: RoundConfig, mask_keys: Mapping[int, bytes],
                 to_sites: Mapping[int, SharesForSite]) -> None:
        self.config = config
        self.mask_keys = dict(mask_keys)  # sites that shared keys -> X25519 mask public key
        self.to_sites = dict(to_sites)
        self.uploaders = frozenset(self.mask_keys)  # who may upload: the sites that shared keys
        self.masked_sum = np.zeros(config.vector_length, dtype=np.uint32)
        self.contributors: set[int] = set()

    def pending(self) -> frozenset[int]:
        """Sites that may upload and have not yet."""
        return self.uploaders - frozenset(self.contributors)

    def receive(self, message: MaskedInput) -> None:
        config = self.config
        check_round(config.round_id, message.round_id, "masked input")
        site = message.site
        if site not in self.uploaders:
            raise ProtocolError("unknown_site", f"site {site} may not upload this round: it is "
                                                "not in the cohort or did not share keys")
        if site in self.contributors:
            raise ProtocolError("replay", f"site {site} already sent its masked input")
        vector = message.masked_vector
        if vector.shape != (config.vector_length,):
            raise ProtocolError("malformed", f"site {site}: masked vector has {vector.size} "
                                             f"words, need {config.vector_length}")
        # Every uint32 is in Z_2^32: only narrower rings need the (extra pass) range check.
        if config.ring_bits < 32 and int(vector.max()) > config.ring_mask:
            raise ProtocolError("malformed", f"site {site}: masked vector has words >= "
                                             f"2^{config.ring_bits}")
        # uint32 addition wraps: arithmetic mod 2^32, reduced to the ring at the end.
        np.add(self.masked_sum, vector, out=self.masked_sum)
        self.contributors.add(site)

    def close(self) -> ServerUnmasking | ServerAborted:
        config = self.config
        survivors = frozenset(self.contributors)
        if len(survivors) < config.min_cohort:
            return ServerAborted(config.round_id, self.phase,
                                 f"{len(survivors)} masked inputs, minimum cohort "
                                 f"{config.min_cohort}: refusing to unmask",
                                 DropReason.BELOW_MIN_COHORT)
        request = UnmaskRequest(config.round_id, survivors, frozenset(self.mask_keys) - survivors)
        return ServerUnmasking(config, request, self.masked_sum, self.mask_keys)
