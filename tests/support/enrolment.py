"""An enrolment request as a site signs it (server.enrolment checks the proof)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.identity_proof import enroll_signed_bytes
from fleetmind.aggregation.secagg import crypto
from fleetmind.protos.fleetmind.v1 import fleet_pb2


def enroll_request(name: str, key: Ed25519PrivateKey | None = None) -> fleet_pb2.EnrollRequest:
    key = key or Ed25519PrivateKey.generate()
    public = crypto.identity_public_bytes(key)
    return fleet_pb2.EnrollRequest(site_name=name, identity_key=public,
                                   proof=key.sign(enroll_signed_bytes(name, public)))
