"""A SecAgg+ round over real loopback gRPC, a step at a time from the test thread: the
aggregator's config for three sites, a site driven phase by phase, the expected merge and
its quantisation bound, and the bad uploads the aggregator must refuse."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.dp import DPConfig, distributed_noise
from fleetmind.aggregation.identity_proof import enroll_signed_bytes
from fleetmind.aggregation.merge import secagg_payload
from fleetmind.aggregation.secagg import SiteAdvertiseKeys, crypto
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2, fleet_pb2_grpc
from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
from fleetmind.sim.bench.wire import PRIVACY, SHAPES, SPEC


def config(data: Path, privacy: PrivacyPolicy = PRIVACY) -> ServerConfig:
    return ServerConfig(data_dir=data, listen="127.0.0.1:0", insecure=True,
                        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=30,
                                            phase_deadline_s=30),
                        privacy=privacy, adapter=SPEC)


def code(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()


def bad_uploads(chunks: list[fleet_pb2.MaskedVectorChunk]
                ) -> list[tuple[list[fleet_pb2.MaskedVectorChunk], grpc.StatusCode]]:
    """Torn, gapped, corrupted and oversized copies of an upload's chunks, each with the
    status the aggregator must refuse it with."""
    corrupted = [fleet_pb2.MaskedVectorChunk() for _ in chunks]
    for copy, original in zip(corrupted, chunks, strict=True):
        copy.CopyFrom(original)
    corrupted[-1].data = bytes(len(corrupted[-1].data))
    oversized = fleet_pb2.MaskedVectorChunk()
    oversized.CopyFrom(chunks[0])
    oversized.total_bytes = 10**9
    return [(chunks[:-1], grpc.StatusCode.INVALID_ARGUMENT),
            ([chunks[0], *chunks[2:]], grpc.StatusCode.INVALID_ARGUMENT),
            (corrupted, grpc.StatusCode.INVALID_ARGUMENT),
            ([oversized], grpc.StatusCode.RESOURCE_EXHAUSTED)]


def reattach_after_restart(sites: list[Site], channel: grpc.Channel) -> None:
    """Points the sites at the restarted aggregator; the first, re-attaching to round 1 (lost
    in flight), must hear that it was abandoned and may be retried."""
    for s in sites:
        s.fleet = fleet_pb2_grpc.FleetStub(channel)
    sites[0].join(round_id=1)
    aborted = sites[0].expect("aborted").aborted
    assert aborted.retry and "restarted" in aborted.reason
    assert (aborted.drop_reason, aborted.site_only) == (
        fleet_pb2.DROP_REASON_ABANDONED_AT_RESTART, False)


class Site:
    """One site's side of a round, a step at a time."""

    def __init__(self, channel: grpc.Channel, name: str, seed: int) -> None:
        self.fleet = fleet_pb2_grpc.FleetStub(channel)
        self.name = name
        self.key = Ed25519PrivateKey.generate()
        public = crypto.identity_public_bytes(self.key)
        reply = self.fleet.Enroll(fleet_pb2.EnrollRequest(
            site_name=name, identity_key=public,
            proof=self.key.sign(enroll_signed_bytes(name, public))), timeout=5)
        self.id = reply.site
        self.aggregator_key = reply.aggregator_key
        rng = np.random.default_rng(seed)
        # Per-coordinate values well inside the fixed-point clip of 1.0.
        self.delta = {n: rng.uniform(-0.3, 0.3, s).astype(np.float32) for n, s in SHAPES.items()}
        self.weight = 1.0
        self.noise = False  # True: this site's share of distributed DP noise, as sites add
        self.stream = None
        self.state = None

    def join(self, round_id: int | None = None) -> None:
        request = fleet_pb2.JoinRoundRequest(site=self.id, base_version=0, contributing_units=1)
        if round_id is not None:
            request.round_id = round_id
        self.stream = self.fleet.JoinRound(request, timeout=30)

    def expect(self, kind: str) -> fleet_pb2.RoundEvent:
        for event in self.stream:
            which = event.WhichOneof("event")
            if which == "waiting":
                continue
            assert which == kind, f"site {self.id} expected {kind}, got {event}"
            return event
        raise AssertionError(f"site {self.id}: stream ended before {kind}")

    def advertise(self) -> fleet_pb2.Receipt:
        event = self.expect("config")
        self.wire_config = event.config
        self.round_id = event.round_id
        self.config = codec.round_config_from_wire(event.config)
        self.state = SiteAdvertiseKeys(self.config, self.id, self.key)
        self.advertisement = codec.advertisement_to_wire(self.state.advertisement)
        return self.fleet.AdvertiseKeys(self.advertisement, timeout=5)

    def share(self) -> fleet_pb2.Receipt:
        keys = codec.advertised_keys_from_wire(self.expect("advertised_keys").advertised_keys)
        self.state = self.state.receive(keys)
        self.shares = codec.encrypted_shares_to_wire(self.state.encrypted_shares)
        return self.fleet.ShareKeys(self.shares, timeout=5)

    def masked_chunks(self) -> list[fleet_pb2.MaskedVectorChunk]:
        bundle = codec.shares_for_site_from_wire(self.expect("shares_for_site").shares_for_site)
        delta_code, weight_code = codec.payload_codes(self.wire_config)
        flat = np.concatenate([self.weight * self.delta[n].reshape(-1) for n in sorted(SHAPES)])
        w = self.wire_config
        noise = distributed_noise(DPConfig(w.clip_norm, w.noise_multiplier, w.privacy_unit,
                                           w.noise_mode, w.expected_cohort),
                                  delta_code, flat.size) if self.noise else None
        ring = secagg_payload(flat, self.weight, delta_code, weight_code,
                              integer_noise=noise)
        masked, self.state = self.state.receive(bundle).mask(ring)
        return list(codec.masked_input_to_chunks(masked, self.config.ring_bits, chunk_bytes=64))

    def submit(self, chunks) -> fleet_pb2.MaskedVectorReceipt:
        return self.fleet.SubmitMaskedVector(iter(chunks), timeout=5)

    def unmask(self) -> fleet_pb2.Receipt:
        request = codec.unmask_request_from_wire(self.expect("unmask_request").unmask_request)
        self.unmask_wire = codec.unmask_shares_to_wire(self.state.respond(request))
        return self.fleet.Unmask(self.unmask_wire, timeout=5)


def expected_b(sites: list[Site]) -> dict[str, np.ndarray]:
    # Genesis B is zero; FedAvg with rate 1 adds the weighted mean delta.
    total = sum(s.weight for s in sites)
    return {n: sum(s.weight * s.delta[n] for s in sites) / total for n in SHAPES}


def quantisation_bound(site: Site, count: int) -> float:
    """|S'/W' - S/W| for decoded sums S' (|S'-S| <= eD, |S| <= 0.3 count) and W' (|W'-W| <=
    eW, W = count): eD/(W-eW) + |S| eW/(W(W-eW)), plus float32 rounding."""
    delta_code, weight_code = codec.payload_codes(site.wire_config)
    e_d, e_w = delta_code.sum_error_bound(count), weight_code.sum_error_bound(count)
    return e_d / (count - e_w) + 0.3 * count * e_w / (count * (count - e_w)) + 1e-6


PHASES = ("join", "advertise", "share", "upload", "unmask")


def run_phases(sites: list[Site], first: str = "join", last: str = "unmask") -> None:
    """Each phase from `first` to `last` (PHASES), every site in turn before the next phase;
    "upload" submits the site's masked vector."""
    for phase in PHASES[PHASES.index(first):PHASES.index(last) + 1]:
        for s in sites:
            if phase == "upload":
                s.submit(s.masked_chunks())
            else:
                getattr(s, phase)()


def run_round(sites: list[Site]) -> None:
    run_phases(sites)


def four_site_config(tmp_path: Path) -> ServerConfig:
    """Four sites, at least three: a phase closes half a second after its last answer."""
    return ServerConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", insecure=True,
                        cohort=CohortPolicy(min_size=3, target_size=4, deadline_s=30,
                                            phase_deadline_s=0.5),
                        privacy=PRIVACY, adapter=SPEC)
