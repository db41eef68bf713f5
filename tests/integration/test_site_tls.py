"""The site agent's own channel under mTLS: it enrols, downloads and activates over the
channel `make_channel` builds from a SiteConfig, and a site of another CA is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.pki import aggregator_tls

from fleetmind.client import agent, site
from fleetmind.client import versions as site_versions
from fleetmind.server import identity
from fleetmind.server.config import ServerConfig
from fleetmind.server.service import serve


def site_config(toy_model_dir: Path, folder: Path, ca: identity.Credentials, name: str,
                address: str, aggregator_key: bytes) -> site.SiteConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca.certificate_pem)
    identity.issue_site(ca, name).save(folder, name)
    return site.SiteConfig(
        name=name, data_dir=folder / "data", model_dir=toy_model_dir, aggregator=address,
        identity_key=folder / "identity.key", aggregator_key=aggregator_key,
        tls=site.SiteTls(folder / "ca.crt", folder / f"{name}.crt", folder / f"{name}.key"))


def test_the_site_channel_speaks_mtls_and_only_to_its_own_fleet(toy_model_dir,
                                                                tmp_path: Path) -> None:
    ca, tls = aggregator_tls(tmp_path / "certs")
    running = serve(ServerConfig(data_dir=tmp_path / "aggregator", tls=tls))
    key = running.coordinator.registry.public_key.public_bytes_raw()
    try:
        config = site_config(toy_model_dir, tmp_path / "site-a", ca, "site-a",
                             running.address, key)
        with site.make_channel(config) as channel:
            enrolment = agent.enroll(channel, Ed25519PrivateKey.generate(), "site-a")
            assert enrolment.latest_version == 0
            folder = site_versions.download_latest(channel, config.data_dir, key)
            assert site_versions.activate(config.data_dir, folder) == 0
        stranger = site_config(toy_model_dir, tmp_path / "site-b", identity.create_ca(),
                               "site-b", running.address, key)
        with site.make_channel(stranger) as channel, pytest.raises(grpc.RpcError) as refused:
            agent.enroll(channel, Ed25519PrivateKey.generate(), "site-b", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=None)
