"""50 sites at once against one aggregator over real loopback gRPC: each enrols, watches and
downloads; a version published while they watch reaches every one of them."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.client import agent
from fleetmind.client import versions as site_versions
from fleetmind.protos.fleetmind.v1 import models_pb2, models_pb2_grpc
from fleetmind.server import service
from fleetmind.server.config import ServerConfig
from fleetmind.server.versions import Release

SITES = 50


def test_fifty_sites_enrol_watch_and_download_at_once(tmp_path: Path) -> None:
    running = service.serve(ServerConfig(data_dir=tmp_path / "aggregator", insecure=True))
    registry = running.coordinator.registry
    key = registry.public_key.public_bytes_raw()
    channel = grpc.insecure_channel(running.address)
    watching = threading.Barrier(SITES + 1, timeout=60)
    announced: dict[int, list[int]] = {}
    activated: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def one_site(number: int) -> None:
        try:
            enrolment = agent.enroll(channel, Ed25519PrivateKey.generate(), f"site-{number:02d}")
            assert enrolment.latest_version == 0
            folder = tmp_path / f"site-{number:02d}"
            stream = models_pb2_grpc.ModelsStub(channel).Watch(
                models_pb2.WatchRequest(), timeout=60)
            seen = [next(stream).version]
            activated[number] = [site_versions.activate(
                folder, site_versions.download_latest(channel, folder, key))]
            watching.wait()
            seen.append(next(stream).version)
            stream.cancel()
            announced[number] = seen
            activated[number].append(site_versions.activate(
                folder, site_versions.download_latest(channel, folder, key)))
        except BaseException as error:  # reported below, with the site's number
            failures.append(error)
            watching.abort()

    threads = [threading.Thread(target=one_site, args=(n,)) for n in range(SITES)]
    try:
        for thread in threads:
            thread.start()
        watching.wait()  # every site enrolled, holds version 0 and is watching
        _, b = registry.latest().tensors()
        registry.publish({m: t + 0.01 for m, t in b.items()},
                         Release(round_id=1, cohort_size=SITES, clip_norm=1.0,
                                 noise_multiplier=0.8, noise_mode="distributed", epsilon=0.1,
                                 delta=1e-5))
        for thread in threads:
            thread.join(timeout=120)
    finally:
        channel.close()
        running.stop(grace=None)
    assert failures == []
    assert announced == {n: [0, 1] for n in range(SITES)}
    assert activated == {n: [0, 1] for n in range(SITES)}
    assert all(site_versions.current_version(tmp_path / f"site-{n:02d}") == 1
               for n in range(SITES))


def test_an_idle_site_wakes_when_a_version_is_announced(tmp_path: Path) -> None:
    import time

    from fleetmind.client.site import wait_for_version

    running = service.serve(ServerConfig(data_dir=tmp_path / "aggregator", insecure=True))
    registry = running.coordinator.registry
    channel = grpc.insecure_channel(running.address)
    stop = threading.Event()
    try:
        started = time.monotonic()
        assert wait_for_version(channel, 0, 0.5, stop) is None  # nothing new: time limit
        assert time.monotonic() - started < 5
        woke: list[int | None] = []
        waiter = threading.Thread(target=lambda: woke.append(
            wait_for_version(channel, 0, 30, stop)))
        waiter.start()
        _, b = registry.latest().tensors()
        registry.publish({m: t + 0.01 for m, t in b.items()},
                         Release(round_id=1, cohort_size=3, clip_norm=1.0,
                                 noise_multiplier=0.8, noise_mode="distributed", epsilon=0.1,
                                 delta=1e-5))
        waiter.join(10)
        assert woke == [1]
        stop.set()  # a stopping site does not sit out the whole wait
        started = time.monotonic()
        assert wait_for_version(channel, 1, 30, stop) is None
        assert time.monotonic() - started < 5
    finally:
        channel.close()
        running.stop(grace=None)
