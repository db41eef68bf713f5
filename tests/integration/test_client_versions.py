"""The site's model distribution over real loopback gRPC: download, verify, activate, roll
back; every unsigned, tampered or corrupted version is refused and never activated."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.tamper import flip_last_bit

from fleetmind.aggregation import manifest as manifest_format
from fleetmind.cli import main as cli
from fleetmind.client import versions as site
from fleetmind.protos.fleetmind.v1 import models_pb2
from fleetmind.runtime.layout import verify_folder
from fleetmind.runtime.signed_log import canonical_json
from fleetmind.server import service
from fleetmind.server.config import ServerConfig
from fleetmind.server.versions import ADAPTER_WEIGHTS, Release

Hook = Callable[[object], object]


class Aggregator:
    """A dev-mode aggregator on 127.0.0.1:0 and a channel to it."""

    def __init__(self, data: Path) -> None:
        self.running = service.serve(ServerConfig(data_dir=data, insecure=True))
        self.channel = grpc.insecure_channel(self.running.address)
        self.registry = self.running.coordinator.registry
        self.key = self.registry.public_key.public_bytes_raw()

    def publish(self) -> int:
        """Publishes version latest+1 with a nudged B (as a round would)."""
        latest = self.registry.latest()
        _, b = latest.tensors()
        round_id = (latest.manifest.round_id or 0) + 1
        release = Release(round_id=round_id, cohort_size=3, clip_norm=1.0,
                          noise_multiplier=0.8, noise_mode="distributed", epsilon=0.1 * round_id,
                          delta=1e-5)
        return self.registry.publish({m: t + 0.01 for m, t in b.items()}, release).number

    def close(self) -> None:
        self.channel.close()
        self.running.stop(grace=None)


@pytest.fixture
def start(tmp_path: Path, monkeypatch) -> Iterator[Callable[..., Aggregator]]:
    """start(chunk=hook, latest=hook): an aggregator whose Models replies pass through the
    hooks first (a stand-in for a corrupting network or a hostile server). The servicer's
    methods are bound when it is registered, so the patch goes in before serve()."""
    started: list[Aggregator] = []

    def _start(chunk: Hook | None = None, latest: Hook | None = None) -> Aggregator:
        if chunk is not None:
            original_get = service.ModelsService.Get

            def get(self, request, context):
                for reply in original_get(self, request, context):
                    yield chunk(reply)
            monkeypatch.setattr(service.ModelsService, "Get", get)
        if latest is not None:
            original_latest = service.ModelsService.Latest
            monkeypatch.setattr(service.ModelsService, "Latest",
                                lambda self, r, c: latest(original_latest(self, r, c)))
        aggregator = Aggregator(tmp_path / "aggregator")
        started.append(aggregator)
        return aggregator

    yield _start
    for aggregator in started:
        aggregator.close()


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    return folder


def _weights_chunk(reply, rehash: bool):
    """The weights' chunk with a flipped byte; `rehash` also fixes its chunk_sha256, so only
    the whole-file hash from the signed manifest can catch it. Only version 1 is hit."""
    if reply.version != 1 or reply.file != ADAPTER_WEIGHTS or not reply.data:
        return reply  # genesis passes intact: it is the good version to stay on
    bad = models_pb2.FileChunk()
    bad.CopyFrom(reply)
    bad.data = flip_last_bit(reply.data)
    if rehash:
        bad.chunk_sha256 = hashlib.sha256(bad.data).digest()
    return bad


def test_download_verify_activate_and_roll_back(start, site_dir) -> None:
    aggregator = start()
    genesis = site.download_latest(aggregator.channel, site_dir, aggregator.key,
                                   max_chunk_bytes=1000)
    assert genesis == site_dir / "versions" / "00000000"
    assert site.current_version(site_dir) is None  # downloaded is not activated
    assert site.activate(site_dir, genesis) == 0
    assert site.current_version(site_dir) == 0 and site.previous_version(site_dir) is None
    # What the site holds is byte for byte what the aggregator published.
    published = aggregator.registry.get(0).folder
    for path in published.iterdir():
        assert (site_dir / "current" / path.name).read_bytes() == path.read_bytes()

    assert aggregator.publish() == 1
    first = site.download_latest(aggregator.channel, site_dir, aggregator.key)
    site.activate(site_dir, first, public_key=aggregator.key)
    assert (site.current_version(site_dir), site.previous_version(site_dir)) == (1, 0)
    assert (site_dir / "current").resolve() == first.resolve()
    assert not (site_dir / "current").readlink().is_absolute()  # the folder can move
    # Downloading what is already here and intact fetches nothing new.
    assert site.download_latest(aggregator.channel, site_dir, aggregator.key) == first

    assert site.rollback(site_dir) == (1, 0)
    assert site.current_version(site_dir) == 0
    with pytest.raises(site.RollbackError, match="nothing to roll back"):
        site.rollback(site_dir)  # one step: version 1 is not a rollback target
    assert site.current_version(site_dir) == 0


def test_a_persistently_bad_chunk_is_refetched_then_refused(start, site_dir) -> None:
    aggregator = start(chunk=lambda reply: _weights_chunk(reply, rehash=False))
    site.activate(site_dir, _genesis_dir(aggregator, site_dir))
    aggregator.publish()
    with pytest.raises(site.VersionError, match=r"does not match its sha256.*refetches"):
        site.download_latest(aggregator.channel, site_dir, aggregator.key,
                             max_chunk_bytes=512)
    _assert_untouched(site_dir)


def test_a_transiently_bad_chunk_is_refetched_from_its_offset(start, site_dir) -> None:
    corrupted: list[int] = []

    def once(reply):
        if reply.file == ADAPTER_WEIGHTS and reply.offset == 512 and not corrupted:
            corrupted.append(reply.offset)
            return _weights_chunk(reply, rehash=False)
        return reply
    aggregator = start(chunk=once)
    site.activate(site_dir, _genesis_dir(aggregator, site_dir))
    aggregator.publish()
    folder = site.download_latest(aggregator.channel, site_dir, aggregator.key,
                                  max_chunk_bytes=512)
    assert corrupted == [512]
    assert site.activate(site_dir, folder, public_key=aggregator.key) == 1


@pytest.mark.parametrize("tamper_latest, message", [
    (lambda a: a.__setattr__("manifest_sig", b""), "unsigned"),
    (lambda a: a.__setattr__("manifest_sig", flip_last_bit(a.manifest_sig)), "does not verify"),
    (lambda a: a.__setattr__("manifest", a.manifest.replace(b'"epsilon":0.1',
                                                            b'"epsilon":0.0')),
     "does not verify"),
])
def test_an_unsigned_or_altered_manifest_is_refused(start, site_dir, tamper_latest,
                                                    message) -> None:
    def latest(announcement):
        if announcement.version == 1:
            tamper_latest(announcement)
        return announcement
    aggregator = start(latest=latest)
    site.activate(site_dir, _genesis_dir(aggregator, site_dir))
    aggregator.publish()
    with pytest.raises(site.VersionError, match=message):
        site.download_latest(aggregator.channel, site_dir, aggregator.key)
    _assert_untouched(site_dir)


def test_a_file_altered_with_matching_chunk_hashes_is_refused(start, site_dir) -> None:
    aggregator = start(chunk=lambda reply: _weights_chunk(reply, rehash=True))
    site.activate(site_dir, _genesis_dir(aggregator, site_dir))
    aggregator.publish()
    with pytest.raises(site.VersionError, match="does not match its sha256 in the manifest"):
        site.download_latest(aggregator.channel, site_dir, aggregator.key)
    _assert_untouched(site_dir)


def test_a_version_corrupted_on_the_aggregator_is_refused(start, site_dir) -> None:
    aggregator = start()
    site.activate(site_dir, _genesis_dir(aggregator, site_dir))
    folder = aggregator.registry.get(aggregator.publish()).folder
    (folder / ADAPTER_WEIGHTS).write_bytes(flip_last_bit((folder / ADAPTER_WEIGHTS).read_bytes()))
    with pytest.raises(site.VersionError, match="refused"):
        site.download_latest(aggregator.channel, site_dir, aggregator.key)
    _assert_untouched(site_dir)


def test_another_aggregators_key_is_refused(start, site_dir) -> None:
    aggregator = start()
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(site.VersionError, match="does not verify"):
        site.download_latest(aggregator.channel, site_dir, stranger)
    assert not (site_dir / "versions").exists()


def test_activation_refuses_a_folder_tampered_after_download(start, site_dir) -> None:
    aggregator = start()
    folder = _genesis_dir(aggregator, site_dir)
    (folder / ADAPTER_WEIGHTS).write_bytes(flip_last_bit((folder / ADAPTER_WEIGHTS).read_bytes()))
    with pytest.raises(site.VersionError, match="does not match its sha256"):
        site.activate(site_dir, folder, public_key=aggregator.key)
    with pytest.raises(site.VersionError, match="not a version folder"):
        site.activate(site_dir, site_dir)
    assert site.current_version(site_dir) is None
    # A damaged, inactive copy is fetched afresh rather than trusted.
    assert site.download_latest(aggregator.channel, site_dir, aggregator.key) == folder
    verify_folder(folder, aggregator.key)


def test_cli_rollback_exits_0_then_2(start, site_dir, capsys) -> None:
    aggregator = start()
    site.activate(site_dir, _genesis_dir(aggregator, site_dir))
    aggregator.publish()
    site.activate(site_dir, site.download_latest(aggregator.channel, site_dir, aggregator.key))
    assert cli.main(["client", "rollback", "--site", str(site_dir)]) == 0
    assert "from version 1 to version 0" in capsys.readouterr().out
    assert site.current_version(site_dir) == 0
    assert cli.main(["client", "rollback", "--site", str(site_dir)]) == 2
    assert "nothing to roll back" in capsys.readouterr().err
    assert cli.main(["client", "rollback", "--site", str(site_dir / "absent")]) == 2
    assert "no such site folder" in capsys.readouterr().err


def test_verify_manifest_is_pure_and_matches_the_servers_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    files = {manifest_format.ADAPTER_CONFIG: b"{}", manifest_format.ADAPTER_WEIGHTS: b"w"}
    manifest = manifest_format.Manifest(
        0, None, "m", "ab" * 32, 1, None, 0, 0.0, 0.0, "none", 0.0, 0.0,
        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    raw = manifest.to_bytes()
    assert raw == canonical_json(json.loads(raw))  # one canonical form, both sides
    public = key.public_key().public_bytes_raw()
    assert manifest_format.verify_manifest(raw, key.sign(raw), public, files) == manifest
    for changed, message in [({**files, "x.bin": b""}, "not in the manifest"),
                             ({manifest_format.ADAPTER_CONFIG: b"{}"}, "missing"),
                             ({**files, manifest_format.ADAPTER_WEIGHTS: b"v"}, "sha256")]:
        with pytest.raises(manifest_format.VersionError, match=message):
            manifest_format.verify_manifest(raw, key.sign(raw), public, changed)
    with pytest.raises(manifest_format.VersionError, match="32"):
        manifest_format.verify_manifest(raw, key.sign(raw), b"short", files)


def _genesis_dir(aggregator: Aggregator, site_dir: Path) -> Path:
    return site.download_latest(aggregator.channel, site_dir, aggregator.key)


def _assert_untouched(site_dir: Path) -> None:
    """Version 0 still active; nothing of version 1 (not even a partial folder) kept."""
    assert site.current_version(site_dir) == 0
    assert sorted(p.name for p in (site_dir / "versions").iterdir()) == ["00000000"]


def test_a_version_for_another_base_model_is_refused_before_activation(
        start, site_dir, tmp_path, toy_model_dir) -> None:
    """The dev aggregator's versions are for the toy model: a site on it activates them, a
    site on other weights refuses them and `current` does not move."""
    aggregator = start()
    genesis = site.download_latest(aggregator.channel, site_dir, aggregator.key)
    assert site.activate(site_dir, genesis, model_dir=toy_model_dir) == 0
    assert aggregator.publish() == 1
    first = site.download_latest(aggregator.channel, site_dir, aggregator.key)
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not the toy model's weights")
    with pytest.raises(manifest_format.VersionError, match="is for base model"):
        site.activate(site_dir, first, model_dir=other)
    assert site.current_version(site_dir) == 0 and site.previous_version(site_dir) is None
    assert site.activate(site_dir, first, model_dir=toy_model_dir) == 1
