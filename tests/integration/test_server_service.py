"""The aggregator's services at their edges, over real loopback gRPC: health and reflection,
who may enrol and act (plaintext and mTLS), plaintext refused off loopback, Models refusals."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.enrolment import enroll_request
from support.net import status_of
from support.pki import aggregator_tls

from fleetmind.protos.fleetmind.v1 import fleet_pb2, fleet_pb2_grpc, models_pb2, models_pb2_grpc
from fleetmind.server import identity, versions
from fleetmind.server.config import ConfigError, ServerConfig
from fleetmind.server.limits import ServerLimits
from fleetmind.server.service import serve


@pytest.fixture
def plaintext(tmp_path: Path):
    running = serve(ServerConfig(data_dir=tmp_path / "data", insecure=True))
    channel = grpc.insecure_channel(running.address)
    yield running, channel
    channel.close()
    running.stop(grace=None)


def test_health_and_reflection_answer(plaintext) -> None:
    _, channel = plaintext
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fleetmind.v1.Fleet", "fleetmind.v1.Models", "fleetmind.v1.Audit"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"fleetmind.v1.Fleet", "fleetmind.v1.Models", "fleetmind.v1.Audit",
            "grpc.health.v1.Health"} <= names


def test_enrolment_is_idempotent_and_proven(plaintext) -> None:
    running, channel = plaintext
    fleet = fleet_pb2_grpc.FleetStub(channel)
    key = Ed25519PrivateKey.generate()
    first = fleet.Enroll(enroll_request("site-a", key), timeout=5)
    assert fleet.Enroll(enroll_request("site-a", key), timeout=5) == first
    assert first.site == 1 and first.latest_version == 0
    assert first.aggregator_key == running.coordinator.registry.public_key.public_bytes_raw()
    unproven = enroll_request("site-b")
    unproven.proof = bytes(64)
    assert status_of(lambda: fleet.Enroll(unproven, timeout=5)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert status_of(lambda: fleet.Enroll(enroll_request("site-a"), timeout=5)) == \
        grpc.StatusCode.ALREADY_EXISTS  # a name keeps its key
    assert status_of(lambda: fleet.Enroll(enroll_request("bad name!"), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert len(running.coordinator.enrolments) == 1  # refusals enrolled nobody


def test_an_unenrolled_site_is_refused_everywhere(plaintext) -> None:
    running, channel = plaintext
    fleet = fleet_pb2_grpc.FleetStub(channel)
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert status_of(lambda: fleet.JoinRound(fleet_pb2.JoinRoundRequest(site=7),
                                             timeout=5)) == denied
    assert status_of(lambda: fleet.AdvertiseKeys(fleet_pb2.KeyAdvertisement(
        round_id=1, site=7), timeout=5)) == denied
    assert status_of(lambda: fleet.SubmitMaskedVector(iter([fleet_pb2.MaskedVectorChunk(
        round_id=1, site=7, total_bytes=4, data=b"1234")]), timeout=5)) == denied
    assert running.coordinator.waiting().ready_sites == 0


def test_models_serve_genesis_and_refuse_what_is_not_there(plaintext) -> None:
    running, channel = plaintext
    models = models_pb2_grpc.ModelsStub(channel)
    latest = models.Latest(models_pb2.LatestRequest(), timeout=5)
    assert latest.version == 0
    running.coordinator.registry.public_key.verify(latest.manifest_sig, latest.manifest)
    config = b"".join(c.data for c in models.Get(models_pb2.GetRequest(
        version=0, file=versions.ADAPTER_CONFIG), timeout=5))
    assert config == (running.coordinator.registry.get(0).folder
                      / versions.ADAPTER_CONFIG).read_bytes()
    for request, status in ((models_pb2.GetRequest(version=5, file=versions.ADAPTER_CONFIG),
                             grpc.StatusCode.NOT_FOUND),
                            (models_pb2.GetRequest(version=0, file="../aggregator-signing.key"),
                             grpc.StatusCode.NOT_FOUND),
                            (models_pb2.GetRequest(version=0, file=versions.ADAPTER_CONFIG,
                                                   offset=10**6),
                             grpc.StatusCode.OUT_OF_RANGE)):
        assert status_of(lambda r=request: models.Get(r, timeout=5)) == status


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "10.1.2.3:7443", "example.org:7443"])
def test_plaintext_is_refused_off_loopback(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="plaintext refused"):
        ServerConfig(data_dir=tmp_path, listen=listen, insecure=True)
    with pytest.raises(ConfigError, match="no tls configured"):
        ServerConfig(data_dir=tmp_path, listen=listen)
    assert not (tmp_path / "ledger.sqlite").exists()


def test_mtls_admits_fleet_sites_under_their_own_name_only(tmp_path: Path) -> None:
    ca, tls = aggregator_tls(tmp_path / "certs")
    running = serve(ServerConfig(data_dir=tmp_path / "data", tls=tls))
    try:
        def channel(site: identity.Credentials | None, trust: bytes = ca.certificate_pem):
            return grpc.secure_channel(running.address,
                                       identity.channel_credentials(site, trust))
        site_a, site_b = identity.issue_site(ca, "site-a"), identity.issue_site(ca, "site-b")
        with channel(site_a) as a, channel(site_b) as b:
            fleet_a, fleet_b = fleet_pb2_grpc.FleetStub(a), fleet_pb2_grpc.FleetStub(b)
            enrolled = fleet_a.Enroll(enroll_request("site-a"), timeout=5)
            # site-b's certificate can neither enrol as site-a nor act as site-a's id.
            assert status_of(lambda: fleet_b.Enroll(enroll_request("site-a"), timeout=5)) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert status_of(lambda: fleet_b.JoinRound(fleet_pb2.JoinRoundRequest(
                site=enrolled.site), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        # A certificate from another CA, or none, never gets past the handshake.
        stranger = identity.issue_site(identity.create_ca(), "site-a")
        for creds in (stranger, None):
            with channel(creds) as c:
                assert status_of(lambda c=c: fleet_pb2_grpc.FleetStub(c).Enroll(
                    enroll_request("site-a"), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(running.address) as plain:
            assert status_of(lambda: health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
        assert len(running.coordinator.enrolments) == 1
    finally:
        running.stop(grace=None)


def test_a_queued_site_that_hangs_up_leaves_the_queue(plaintext) -> None:
    running, channel = plaintext
    fleet = fleet_pb2_grpc.FleetStub(channel)
    site = fleet.Enroll(enroll_request("site-a"), timeout=5).site
    stream = fleet.JoinRound(fleet_pb2.JoinRoundRequest(site=site, contributing_units=1),
                             timeout=30)
    waiting = next(stream).waiting
    assert (waiting.ready_sites, waiting.target_cohort) == (1, 10)
    stream.cancel()
    assert running.coordinator.wait(lambda: running.coordinator.waiting().ready_sites == 0, 5)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_calls", 0, "must be a finite number > 0"),
    ("stream_max_s", float("inf"), "must be a finite number > 0"),
    ("max_calls", 2.5, "must be an integer"),
    ("min_site_weight", 2.0, "<= 1"),
    ("stream_max_s", 1000.0, "must exceed stream_max_s"),
    ("max_details_chars", 10, ">= 40"),
    ("reserved_workers", True, "must be a finite number > 0"),
])
def test_limits_are_validated_at_construction(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerLimits(**{field: value})


def test_the_pool_fits_both_caps_and_the_reserve() -> None:
    limits = ServerLimits()
    assert limits.streams(256) == 256 and ServerLimits(max_streams=10).streams(256) == 10
    assert limits.workers(256) == 256 + limits.max_calls + limits.reserved_workers
