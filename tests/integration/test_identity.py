"""Certificates gRPC's TLS accepts, proved over real loopback mTLS; the signing key's file."""

import os
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fleetmind.aggregation.identity_proof import is_small_order
from fleetmind.server import identity

WHOAMI = "/fleetmind.test.Echo/WhoAmI"


@pytest.fixture(scope="module")
def pki():
    ca = identity.create_ca()
    return ca, identity.issue_server(ca, ["127.0.0.1", "localhost"]), \
        identity.issue_site(ca, "site-a")


@pytest.fixture(scope="module")
def served(pki):
    """A health service plus a method that echoes the caller's certificate name, over mTLS
    on an OS-picked loopback port."""
    ca, server_creds, _ = pki
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    whoami = grpc.unary_unary_rpc_method_handler(
        lambda request, context: (identity.peer_site_name(context) or "").encode())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "fleetmind.test.Echo", {"WhoAmI": whoami})])
    port = server.add_secure_port("127.0.0.1:0",
                                  identity.server_credentials(server_creds,
                                                              ca.certificate_pem))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def _check(target: str, credentials: grpc.ChannelCredentials):
    with grpc.secure_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_a_site_with_a_fleet_certificate_is_served_and_named(pki, served) -> None:
    ca, _, site = pki
    credentials = identity.channel_credentials(site, ca.certificate_pem)
    assert _check(served, credentials).status == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(served, credentials) as channel:
        assert channel.unary_unary(WHOAMI)(b"", timeout=5) == b"site-a"


def test_a_client_without_a_certificate_is_refused(pki, served) -> None:
    ca, _, _ = pki
    with pytest.raises(grpc.RpcError) as caught:
        _check(served, identity.channel_credentials(None, ca.certificate_pem))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails


def test_a_certificate_from_another_ca_is_refused(pki, served) -> None:
    ca, _, _ = pki
    stranger = identity.issue_site(identity.create_ca("someone else"), "site-a")
    with pytest.raises(grpc.RpcError) as caught:
        _check(served, identity.channel_credentials(stranger, ca.certificate_pem))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_site_refuses_a_server_its_ca_did_not_sign(pki, served) -> None:
    _, _, site = pki
    other_ca = identity.create_ca("someone else")
    with pytest.raises(grpc.RpcError) as caught:
        _check(served, identity.channel_credentials(site, other_ca.certificate_pem))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_credentials_round_trip_with_a_private_key_file(tmp_path: Path, pki) -> None:
    _, _, site = pki
    _, key_path = site.save(tmp_path, "site-a")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert identity.Credentials.load(tmp_path, "site-a") == site
    with pytest.raises(FileExistsError, match="move it away"):
        site.save(tmp_path, "site-a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-a.crt", "site-a.key"]


def test_mismatched_key_and_certificate_are_refused(pki) -> None:
    _, server_creds, site = pki
    with pytest.raises(ValueError, match="does not belong"):
        identity.Credentials(site.certificate_pem, server_creds.private_key_pem)


def test_bad_site_names_and_empty_hosts_are_refused(pki) -> None:
    ca, _, _ = pki
    with pytest.raises(ValueError, match="site name"):
        identity.issue_site(ca, "../etc")
    with pytest.raises(ValueError, match="at least one host"):
        identity.issue_server(ca, [])


def test_signing_key_is_private_atomic_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "aggregator.key"
    key = identity.create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["aggregator.key"]  # no leftovers
    loaded = identity.load_or_create_signing_key(path)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert identity.public_key_bytes(loaded) == identity.public_key_bytes(key)
    with pytest.raises(FileExistsError, match="already holds a signing key"):
        identity.create_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        identity.load_signing_key(path)


# The 8-torsion of Ed25519 in its canonical encodings (libsodium's blocklist), and the
# non-canonical ones (y >= p, or x's sign set where x = 0).
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # order 1
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "0100000000000000000000000000000000000000000000000000000000000080",  # non-canonical
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]


@pytest.mark.parametrize("encoded", SMALL_ORDER)
def test_small_order_keys_are_recognised(encoded: str) -> None:
    assert is_small_order(bytes.fromhex(encoded))


def test_real_keys_are_not_small_order() -> None:
    for _ in range(64):
        key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not is_small_order(key)
    assert not is_small_order(b"\1" * 31)  # not a key at all: the length check refuses it
