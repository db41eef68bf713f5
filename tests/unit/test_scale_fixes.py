"""The aggregator's per-round and per-version caches (docs/scale.md): each gives the same
bytes on the wire as computing afresh, is invalidated by a new round or version, and is
bounded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.graph import NeighbourGraph
from fleetmind.aggregation.secagg.messages import RoundConfig
from fleetmind.protos.fleetmind.v1 import models_pb2
from fleetmind.server import service, versions
from fleetmind.server.config import ServerConfig
from fleetmind.server.coordinator import Event, RoundSetup
from fleetmind.server.metrics import ServerMetrics


def _setup(round_id: int, sites: list[int], base_version: int = 0) -> RoundSetup:
    identities = {s: crypto.identity_public_bytes(crypto.new_identity()) for s in sites}
    config = RoundConfig(round_id, NeighbourGraph.harary(sites, 4, seed=round_id), 3, 2, 33,
                         24, identities)
    return RoundSetup(config, base_version, 1.0, 0.5, "distributed", "session", len(sites),
                      1.0, 64, 123_456, True, 3)


def test_each_site_is_sent_its_own_neighbourhood_not_the_cohorts_graph() -> None:
    """A site's config names its neighbours and their keys only, so its size does not grow
    with the cohort (docs/scale.md, item 1), and the round's other fields are the same for
    every site."""
    small, large = _setup(7, list(range(1, 11))), _setup(7, list(range(1, 1001)))
    for setup in (small, large):
        graph = setup.config.graph
        for site in (1, 5, 10):
            wire = service._event_to_wire(Event(7, setup), site).config
            assert set(wire.graph) == {site}
            assert set(wire.graph[site].sites) == graph.neighbours[site]
            assert set(wire.identities) == graph.neighbours[site] | {site}
            assert wire.cohort_size == len(graph.sites)
            assert (wire.base_version, wire.threshold, wire.participation_cap) == (0, 3, 3)
    size = {len(setup.config.graph.sites): service._event_to_wire(Event(7, setup), 5)
            .config.ByteSize() for setup in (small, large)}
    assert size[1000] < 1.2 * size[10]  # longer varints only; the graph would be ~40 kB


class _AbortedError(Exception):
    pass


class _Context:
    """Just enough of a grpc.ServicerContext for ModelsService's handlers."""

    def __init__(self, calls: int = 1_000) -> None:
        self.calls = calls
        self.code: grpc.StatusCode | None = None

    def is_active(self) -> bool:
        self.calls -= 1
        return self.calls >= 0

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise _AbortedError(details)


@pytest.fixture
def models(tmp_path: Path):
    coordinator = service.open_coordinator(ServerConfig(data_dir=tmp_path / "data",
                                                        insecure=True))
    yield service.ModelsService(coordinator, ServerMetrics())
    coordinator.ledger.close()


def _publish(models: service.ModelsService, round_id: int) -> int:
    registry = models.registry
    latest = registry.latest()
    assert latest is not None
    _, b = latest.tensors()
    new_b = {module: tensor + round_id for module, tensor in b.items()}
    return registry.publish(new_b, versions.Release(
        round_id=round_id, cohort_size=3, clip_norm=1.0, noise_multiplier=0.0,
        noise_mode="distributed", epsilon=0.0, delta=1e-6)).number


def _fresh_chunks(models: service.ModelsService, number: int, file: str, offset: int,
                  size: int) -> list[bytes]:
    """The chunks as the uncached handler built them: read and hashed afresh."""
    version = models.registry.get(number)
    data = (version.folder / file).read_bytes()
    file_sha = bytes.fromhex(version.manifest.files[file])
    return [models_pb2.FileChunk(version=number, file=file, offset=at,
                                 data=data[at:at + size],
                                 chunk_sha256=hashlib.sha256(data[at:at + size]).digest(),
                                 total_bytes=len(data), file_sha256=file_sha
                                 ).SerializeToString(deterministic=True)
            for at in range(offset, max(len(data), offset + 1), size)]


def _get(models: service.ModelsService, number: int, file: str, offset: int = 0,
         size: int = 0) -> list[models_pb2.FileChunk]:
    return list(models._get(models_pb2.GetRequest(version=number, file=file, offset=offset,
                                                  max_chunk_bytes=size), _Context()))




def test_grpc_keeps_room_for_every_call_the_aggregator_admits() -> None:
    """grpc refuses calls that arrive while more than its pending-call limits (1,000 soft,
    3,000 hard) wait for a worker: at its defaults no server here held more than about 3,300
    streams. The aggregator raises both to everything it admits, never below grpc's own."""
    small = dict(service.pending_call_options(328))
    assert small == {"grpc.server.max_pending_requests": 1000,
                     "grpc.server.max_pending_requests_hard_limit": 3000}
    large = dict(service.pending_call_options(6_072))
    assert set(large.values()) == {6_072}
