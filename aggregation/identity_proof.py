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


# Ed25519's small-order points (the 8-torsion): a public key among them "verifies" forged
# signatures (with R small-order too and S = 0, the check [S]B = R + [k]A holds for many k
# under cofactored verification), so it proves nothing. A point is fixed by y up to the sign
# of x, and the torsion points have y in {1, -1, 0, Y8, -Y8}, Y8 being the y of the
# order-8 points (libsodium's blocklist, crypto_core_ed25519_is_valid_point / the "small
# order" table of ed25519_ref10); y is read mod p, so non-canonical encodings (y >= p) of
# the same points are caught too.
_P = 2**255 - 19
_Y8 = int.from_bytes(bytes.fromhex(
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"), "little")
_SMALL_ORDER_Y = frozenset({0, 1, _P - 1, _Y8, _P - _Y8})


def is_small_order(public_key: bytes) -> bool:
    """Whether a 32-byte Ed25519 public key encodes a point of order 1, 2, 4 or 8 (in any
    encoding, canonical or not): such a key must never be enrolled."""
    if len(public_key) != 32:
        return False
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)  # drop x's sign bit
    return y % _P in _SMALL_ORDER_Y
