"""Round 2 at the server WITHOUT secure aggregation: the plain-sum ablation.

Rounds 0, 1 and 3 do not run. Every cohort site uploads its ring vector unmasked, through
the same message and checks as a masked one, and closing yields the sum of those that
arrived: the same ServerCompleted that unmasking yields, so everything after it (decode,
noise, merge, publish) is one path for both. The server sees each site's vector here;
the aggregator allows this only on a loopback address, to measure what secure
aggregation costs.
"""

from __future__ import annotations

import numpy as np

from fleetmind.aggregation.secagg.messages import DropReason, RoundConfig
from fleetmind.aggregation.secagg.server_completed import ServerAborted, ServerCompleted
from fleetmind.aggregation.secagg.server_r2_masked_input_collection import (
    ServerMaskedInputCollection,
)


class ServerPlainInputCollection(ServerMaskedInputCollection):
    """`receive` each site's unmasked input; `close` at the deadline. The phase keeps its
    masked twin's name: it is the same upload, and sites, metrics and recovery read a
    missed `masked_input_collection` as "this site's vector is not in the sum"."""

    def __init__(self, config: RoundConfig) -> None:
        super().__init__(config, mask_keys={}, to_sites={})
        self.uploaders = frozenset(config.graph.sites)  # no keys to share: the whole cohort

    # The same upload as its masked twin (isinstance checks rely on it), with no unmasking
    # after it: it yields the sum itself.
    def close(self) -> ServerCompleted | ServerAborted:  # type: ignore[override]
        config = self.config
        contributors = frozenset(self.contributors)
        if len(contributors) < config.min_cohort:
            return ServerAborted(config.round_id, self.phase,
                                 f"{len(contributors)} unmasked inputs, minimum cohort "
                                 f"{config.min_cohort}: refusing to sum",
                                 DropReason.BELOW_MIN_COHORT)
        total = self.masked_sum & np.uint32(config.ring_mask)
        return ServerCompleted(config.round_id, total, contributors,
                               self.uploaders - contributors)
