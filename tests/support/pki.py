"""Certificates for an aggregator under mTLS, as `fleetmind server certs` lays them out."""

from __future__ import annotations

from pathlib import Path

from fleetmind.server import identity
from fleetmind.server.config import TlsPaths


def aggregator_tls(certs: Path) -> tuple[identity.Credentials, TlsPaths]:
    """A fresh fleet CA and the aggregator's certificate for 127.0.0.1, written to `certs`
    (ca.crt, aggregator.crt, aggregator.key): the CA, to issue site certificates, and the
    paths a ServerConfig's `tls` takes."""
    ca = identity.create_ca()
    ca.save(certs, "ca")
    identity.issue_server(ca, ["127.0.0.1"]).save(certs, "aggregator")
    return ca, TlsPaths(certs / "aggregator.crt", certs / "aggregator.key", certs / "ca.crt")
