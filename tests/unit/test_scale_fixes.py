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


def _uncached(setup: RoundSetup) -> bytes:
    """The wire config encoded afresh, past the cache."""
    return service._setup_to_wire(setup).SerializeToString(deterministic=True)


def test_two_sites_of_a_round_receive_identical_round_config() -> None:
    setup = _setup(7, list(range(1, 11)))
    first = service._event_to_wire(Event(7, setup))
    second = service._event_to_wire(Event(7, setup))
    assert first.round_id == second.round_id == 7
    assert first.config == second.config
    assert first.config is not second.config  # each event holds its own copy
    assert first.config.SerializeToString(deterministic=True) == _uncached(setup)
    second.config.threshold = 99  # one site's message changed: the cache is not
    assert service._event_to_wire(Event(7, setup)).config.threshold == 3


def test_a_new_round_is_encoded_afresh_and_the_cache_is_bounded() -> None:
    cache = service._SetupWireCache(size=2)
    setups = [_setup(r, list(range(1, 6 + r)), base_version=r) for r in range(1, 5)]
    for setup in setups:
        wire = cache.get(setup)
        assert wire.round_id == setup.config.round_id
        assert wire.base_version == setup.base_version
        assert sorted(wire.graph) == sorted(setup.config.graph.sites)
        assert wire.SerializeToString(deterministic=True) == _uncached(setup)
        assert len(cache) <= 2
    assert cache.get(setups[-1]) is cache.get(setups[-1])  # encoded once, then reused


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


def test_the_watcher_announces_each_new_version_once_from_memory(models) -> None:
    registry = models.registry
    assert registry.latest_number() == 0
    first = models._announce(0)
    assert models._announce(0) is first  # built once per version
    number = _publish(models, 1)
    assert registry.latest_number() == registry.newest() == number == 1  # set at publish
    announced = list(models._watch(models_pb2.WatchRequest(after_version=0), _Context(2)))
    assert [a.version for a in announced] == [1]
    version = registry.get(1)
    assert announced[0].manifest == version.manifest_bytes()
    assert announced[0].manifest_sig == version.signature()
    _publish(models, 2)
    _publish(models, 3)
    assert [a.version for a in models._watch(models_pb2.WatchRequest(after_version=0),
                                             _Context(2))] == [1, 2, 3]
    assert len(models._announcements) <= service.CACHED_VERSIONS  # bounded
    # A restarted aggregator reads the latest number from disk once.
    assert versions.VersionRegistry(registry.folder.parent,
                                    registry._signing_key).latest_number() == 3


def test_downloads_are_cached_per_version_and_bounded(models) -> None:
    weights = versions.ADAPTER_WEIGHTS
    for offset, size in ((0, 0), (0, 100), (37, 100)):
        for _ in range(2):  # the second time from the cache: the same bytes
            got = [c.SerializeToString(deterministic=True)
                   for c in _get(models, 0, weights, offset, size)]
            assert got == _fresh_chunks(models, 0, weights, offset,
                                        min(size or service.DEFAULT_CHUNK,
                                            service.DEFAULT_CHUNK))
    assert _get(models, 0, weights, 5, 100)[0] is _get(models, 0, weights, 5, 100)[0]
    for round_id in (1, 2, 3):  # each new version downloads its own bytes
        number = _publish(models, round_id)
        got = [c.SerializeToString(deterministic=True) for c in _get(models, number, weights)]
        assert got == _fresh_chunks(models, number, weights, 0, service.DEFAULT_CHUNK)
        assert got != _fresh_chunks(models, number - 1, weights, 0, service.DEFAULT_CHUNK)
        assert len(models._downloads) <= service.CACHED_VERSIONS
    assert sorted(models._downloads) == [2, 3]  # the latest two
    _get(models, 0, weights)  # an old version is served, but not cached
    assert sorted(models._downloads) == [2, 3]
    for offset in range(10):  # odd resume offsets do not grow the cache without bound
        _get(models, 3, weights, offset, 100)
    assert len(models._downloads[3][1]) <= service.MAX_CHUNKINGS
    context = _Context()
    with pytest.raises(_AbortedError):
        list(models._get(models_pb2.GetRequest(version=3, file=weights, offset=1 << 40),
                         context))
    assert context.code == grpc.StatusCode.OUT_OF_RANGE


def test_a_changed_version_folder_is_not_served_from_the_cache(models) -> None:
    weights = versions.ADAPTER_WEIGHTS
    assert _get(models, 0, weights)
    models._announce(0)
    path = models.registry.get(0).folder / weights
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    context = _Context()
    with pytest.raises(_AbortedError):
        list(models._get(models_pb2.GetRequest(version=0, file=weights), context))
    assert context.code == grpc.StatusCode.DATA_LOSS
    with pytest.raises(versions.VersionError):
        models._announce(0)


def test_waiting_tracks_the_longest_waiting_site_through_joins_and_leaves(
        tmp_path: Path) -> None:
    from support.coordinator import Clock, Site, open_coordinator
    clock = Clock()
    coordinator = open_coordinator(tmp_path / "data", clock, size=10)
    sites = [Site(coordinator, f"site-{i}", i) for i in range(4)]
    start = clock.now
    assert coordinator.waiting().ready_sites == 0
    assert coordinator.waiting().deadline_unix_ms == int((start + 60) * 1000)
    serials = {}
    for index, site in enumerate(sites):
        clock.now = start + 10 * index
        serials[site.id] = coordinator.join(site.id, None, 0, 1)[1]
    waiting = coordinator.waiting()
    assert waiting.ready_sites == 4 and waiting.target_cohort == 10
    assert waiting.deadline_unix_ms == int((start + 60) * 1000)  # the first site's
    clock.now = start + 35
    coordinator.join(sites[0].id, None, 0, 1)  # a site joining again keeps its place
    assert coordinator.waiting().deadline_unix_ms == int((start + 60) * 1000)
    coordinator.leave(sites[0].id, coordinator._queue[sites[0].id].serial)
    assert coordinator.waiting().deadline_unix_ms == int((start + 10 + 60) * 1000)
    coordinator.leave(sites[2].id, serials[sites[2].id])
    assert coordinator.waiting().deadline_unix_ms == int((start + 10 + 60) * 1000)
    assert coordinator.waiting().ready_sites == 2
    clock.now = start + 80  # past the first queued site's deadline, but 2 < min_size
    coordinator.tick()
    assert coordinator.current_round() is None
    coordinator.join(sites[2].id, None, 0, 1)  # three now, the deadline passed: a round
    assert coordinator.current_round() is not None
    assert coordinator.waiting().ready_sites == 0
    assert coordinator.waiting().deadline_unix_ms == int((clock.now + 60) * 1000)
    coordinator.ledger.close()


def test_a_graph_computes_its_sites_once() -> None:
    graph = NeighbourGraph.harary(range(1, 21), 4, seed=1)
    assert graph.sites == frozenset(range(1, 21))
    assert graph.sites is graph.sites
    assert graph.min_degree == 4
    assert graph == NeighbourGraph(dict(graph.neighbours))  # equality ignores the cache


def _enrol(enrolments, name: str, key=None):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fleetmind.aggregation.identity_proof import enroll_signed_bytes
    key = key or Ed25519PrivateKey.generate()
    public = crypto.identity_public_bytes(key)
    return enrolments.enroll(name, public, key.sign(enroll_signed_bytes(name, public))), key


def test_an_existing_enrolments_file_still_loads(tmp_path: Path) -> None:
    from fleetmind.runtime.signed_log import canonical_json
    from fleetmind.server.enrolment import Enrolments
    keys = {f"site-{i}": bytes([i]) * 32 for i in (1, 2, 3)}
    path = tmp_path / "enrolments.json"  # as the whole-table writer left it
    path.write_bytes(canonical_json({name: {"site": i + 1, "identity_key": key.hex()}
                                     for i, (name, key) in enumerate(keys.items())}))
    enrolments = Enrolments(path)
    assert len(enrolments) == 3
    assert enrolments.get(2) is not None and enrolments.get(2).name == "site-2"
    assert enrolments.identities([1, 3]) == {1: keys["site-1"], 3: keys["site-3"]}
    added, _ = _enrol(enrolments, "site-4")
    assert added.site == 4  # ids continue after the table's
    again = Enrolments(path)
    assert again.get(4) == added and len(again) == 4


def test_enrolment_appends_compacts_and_reloads_the_same_table(tmp_path: Path,
                                                                monkeypatch) -> None:
    from fleetmind.server import enrolment
    from fleetmind.server.enrolment import EnrolmentError, Enrolments
    monkeypatch.setattr(enrolment, "COMPACT_EVERY", 4)
    path = tmp_path / "enrolments.json"
    enrolments = Enrolments(path)
    entries, keys = [], []
    for i in range(10):
        entry, key = _enrol(enrolments, f"site-{i}")
        entries.append(entry)
        keys.append(key)
        reloaded = Enrolments(path)  # every acknowledged enrolment is on disk
        assert [reloaded.get(e.site) for e in entries] == entries
    assert [e.site for e in entries] == list(range(1, 11))
    assert len(enrolments.log_path.read_bytes().splitlines()) == 2  # compacted at 4 and 8
    assert _enrol(enrolments, "site-3", keys[3])[0] == entries[3]  # idempotent
    with pytest.raises(EnrolmentError) as conflict:
        _enrol(enrolments, "site-new", keys[5])  # a key keeps its name
    assert conflict.value.kind == "conflict"
    with pytest.raises(EnrolmentError):
        _enrol(enrolments, "site-5")  # a name keeps its key
    # A crash mid-append leaves a torn last line: never acknowledged, so skipped; and a
    # crash between compaction's table and emptying the log repeats lines the table holds.
    with open(enrolments.log_path, "ab") as log:
        log.write(b'{"identity_key":"ab')
    reloaded = Enrolments(path)
    assert len(reloaded) == 10
    assert _enrol(reloaded, "site-10")[0].site == 11
    table_lines = path.read_bytes()
    Enrolments(path)._append(entries[0])  # a line the table already holds
    assert len(Enrolments(path)) == 11
    assert path.read_bytes() == table_lines
