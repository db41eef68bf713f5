"""A plain-sum round (cohort.secure_aggregation = false) over real loopback gRPC: the
aggregator's config and sites that upload their encoded vectors unmasked."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from fleetmind.aggregation.merge import secagg_payload
from fleetmind.aggregation.secagg.messages import MaskedInput
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2
from fleetmind.server.config import CohortPolicy, ServerConfig
from fleetmind.sim.bench.wire import PRIVACY, SHAPES, SPEC
from support.secagg_rounds import Site as SecAggSite


def plain_config(data: Path, target: int = 3, phase_deadline_s: float = 30) -> ServerConfig:
    return ServerConfig(data_dir=data, listen="127.0.0.1:0", insecure=True,
                        cohort=CohortPolicy(min_size=3, target_size=target, deadline_s=30,
                                            phase_deadline_s=phase_deadline_s,
                                            secure_aggregation=False),
                        privacy=PRIVACY, adapter=SPEC)


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([delta[n].reshape(-1) for n in sorted(SHAPES)])


class Site(SecAggSite):
    """One site's side of a plain round over raw gRPC: join, read the config, upload."""

    def __init__(self, channel: grpc.Channel, name: str, seed: int) -> None:
        super().__init__(channel, name, seed)
        self.rng = np.random.default_rng(seed)  # the payload's stochastic rounding

    def setup(self) -> None:
        """The round's config: a plain round's first and only instruction."""
        event = self.expect("config")
        self.wire, self.round_id = event.config, event.round_id
        assert self.wire.plain_sum

    def chunks(self, delta: dict[str, np.ndarray] | None = None
               ) -> list[fleet_pb2.MaskedVectorChunk]:
        """The encoded update, unmasked, in 64-byte chunks."""
        delta_code, weight_code = codec.payload_codes(self.wire)
        ring = secagg_payload(flat(delta or self.delta), 1.0, delta_code, weight_code, self.rng)
        return list(codec.masked_input_to_chunks(MaskedInput(self.round_id, self.id, ring),
                                                 self.wire.ring_bits, chunk_bytes=64))

    def submit(self, chunks) -> fleet_pb2.MaskedVectorReceipt:
        return self.fleet.SubmitMaskedVector(iter(chunks), timeout=5)

    def upload(self) -> fleet_pb2.MaskedVectorReceipt:
        """The whole of a plain round from the site's side: its config, then its vector."""
        self.setup()
        return self.submit(self.chunks())


def joined(channel: grpc.Channel, count: int, seed: int) -> list[Site]:
    """`count` enrolled sites, each waiting in the open round."""
    sites = [Site(channel, f"site-{i}", seed=seed + i) for i in range(count)]
    for site in sites:
        site.join()
    return sites
