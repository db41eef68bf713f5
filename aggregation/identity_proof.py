"""What a site signs to prove it holds the identity key it enrols with (fleet.proto,
EnrollRequest.proof). Pure bytes, shared by the site that signs and the aggregator that
checks, so neither side can drift from the other."""

from __future__ import annotations

import struct

ENROL_DOMAIN = b"fleetmind/v1/enroll"


def enroll_signed_bytes(site_name: str, identity_key: bytes) -> bytes:
    """The domain, then the name length-prefixed (so no name/key split is ambiguous), then
    the 32-byte Ed25519 public key."""
    name = site_name.encode()
    return ENROL_DOMAIN + struct.pack("<I", len(name)) + name + identity_key
