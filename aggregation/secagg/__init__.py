"""SecAgg+ secure aggregation (Bonawitz et al. 2017; Bell et al. 2020) as transport-free
state machines, one module per phase for the site and for the server (the layout of
Google's federated-compute `fcp/secagg`):

    site_r0_advertise_keys -> site_r1_share_keys -> site_r2_masked_input -> site_r3_unmasking
    server_r0_advertise_keys -> server_r1_share_keys -> server_r2_masked_input_collection
        -> server_r3_unmasking -> server_completed (ServerCompleted | ServerAborted)
    server_r2_plain_input_collection -> server_completed   (the ablation without secure
        aggregation: unmasked inputs summed, rounds 0, 1 and 3 skipped; loopback only)

`crypto` holds every primitive, `graph` the neighbour graph, `messages` the configuration,
messages and refusals, `loopback` a one-process driver. The server only ever holds the
running sum of masked vectors and, at the end, the cohort sum.

Threat model: sites and server follow the protocol but may drop out or collude below the
threshold (honest-but-curious); signatures stop the server from substituting keys. The
active-security consistency round of Bonawitz et al. (sites signing the survivor list) is
not implemented.
"""

from fleetmind.aggregation.secagg.graph import (
    NeighbourGraph,
    majority_threshold,
    secagg_plus_degree,
)
from fleetmind.aggregation.secagg.loopback import Dropouts, LoopbackReport, run_round
from fleetmind.aggregation.secagg.messages import (
    DropReason,
    ProtocolError,
    RoundConfig,
    RoundPhase,
)
from fleetmind.aggregation.secagg.server_completed import ServerAborted, ServerCompleted
from fleetmind.aggregation.secagg.server_r0_advertise_keys import ServerAdvertiseKeys
from fleetmind.aggregation.secagg.site_r0_advertise_keys import SiteAdvertiseKeys

__all__ = [
    "DropReason",
    "Dropouts",
    "LoopbackReport",
    "NeighbourGraph",
    "ProtocolError",
    "RoundConfig",
    "RoundPhase",
    "ServerAborted",
    "ServerAdvertiseKeys",
    "ServerCompleted",
    "SiteAdvertiseKeys",
    "majority_threshold",
    "run_round",
    "secagg_plus_degree",
]
