"""The coordinator driven directly, without gRPC: a clock the test moves, a coordinator
over a data folder, and a site stepped through the coordinator's public methods."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.identity_proof import enroll_signed_bytes
from fleetmind.aggregation.merge import secagg_payload
from fleetmind.aggregation.secagg import SiteAdvertiseKeys, crypto
from fleetmind.aggregation.secagg.messages import (
    AdvertisedKeys,
    SharesForSite,
    UnmaskRequest,
    pack_ring,
)
from fleetmind.server import identity
from fleetmind.server.config import CohortPolicy, PrivacyPolicy
from fleetmind.server.coordinator import Coordinator, RoundSetup
from fleetmind.server.enrolment import Enrolments
from fleetmind.server.ledger import Ledger
from fleetmind.server.versions import VersionRegistry
from fleetmind.sim.bench.wire import SHAPES, SPEC

PRIVACY = PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0,
                        fixed_point_clip=1.0)


PHASE_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def open_coordinator(data: Path, clock: Clock, size: int = 4,
                     privacy: PrivacyPolicy = PRIVACY) -> Coordinator:
    data.mkdir(parents=True, exist_ok=True)
    key = identity.load_or_create_signing_key(data / "signing.key")
    registry = VersionRegistry(data, key)
    if not registry.numbers():
        registry.genesis(SPEC)
    cohort = CohortPolicy(min_size=3, target_size=size, deadline_s=60,
                          phase_deadline_s=PHASE_S)
    return Coordinator(data, registry, Ledger(data / "ledger.sqlite", key),
                       Enrolments(data / "enrolments.json"), cohort, privacy, clock=clock)


class Site:
    """One site, a step at a time, through the coordinator's public methods."""

    def __init__(self, coordinator: Coordinator, name: str, seed: int) -> None:
        self.coordinator = coordinator
        self.key = Ed25519PrivateKey.generate()
        public = crypto.identity_public_bytes(self.key)
        self.id = coordinator.enrolments.enroll(
            name, public, self.key.sign(enroll_signed_bytes(name, public))).site
        rng = np.random.default_rng(seed)
        self.delta = {n: rng.uniform(-0.05, 0.05, s).astype(np.float32)
                      for n, s in SHAPES.items()}
        self.round_id: int | None = None
        self.cursor = 0

    def next(self) -> object:
        round_id, events = self.coordinator.follow(self.id, self.round_id, self.cursor, 0)
        assert events, f"site {self.id}: nothing new in round {round_id}"
        if round_id != self.round_id:
            self.round_id, self.cursor = round_id, 0
        self.cursor += 1
        return events[0].payload

    def outcome(self, round_id: int = 1) -> object:
        """The last event of `round_id` for this site (its end, once it ended)."""
        _, events = self.coordinator.follow(self.id, round_id, 0, 0)
        return events[-1].payload

    def join(self, units: int = 1) -> None:
        self.coordinator.join(self.id, None, 0, units)

    def advertise(self) -> None:
        setup = self.next()
        assert isinstance(setup, RoundSetup)
        self.setup = setup
        self.state = SiteAdvertiseKeys(setup.config, self.id, self.key)
        self.coordinator.advertise(self.state.advertisement)

    def share(self) -> None:
        keys = self.next()
        assert isinstance(keys, AdvertisedKeys)
        self.state = self.state.receive(keys)
        self.coordinator.share(self.state.encrypted_shares)

    def submit(self, forge_weight: bool = False) -> None:
        bundle = self.next()
        assert isinstance(bundle, SharesForSite)
        delta_code, weight_code = Coordinator.round_codes(self.setup)
        flat = np.concatenate([self.delta[n].reshape(-1) for n in sorted(SHAPES)])
        ring = secagg_payload(flat, 1.0, delta_code, weight_code)
        if forge_weight:  # a weight word no honest site could send
            ring = ring.copy()
            ring[-1] = np.uint32((int(ring[-1]) + (1 << 30)) & self.setup.config.ring_mask)
        masked, self.unmasking = self.state.receive(bundle).mask(ring)
        digest = hashlib.sha256(pack_ring(masked.masked_vector, 32)).digest()
        self.coordinator.submit(masked, digest)

    def unmask(self) -> None:
        request = self.next()
        assert isinstance(request, UnmaskRequest)
        self.coordinator.unmask(self.unmasking.respond(request))
