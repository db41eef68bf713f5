"""Every cryptographic primitive the secure-aggregation protocol touches, in one place.

All of it comes from the `cryptography` package (OpenSSL), at 128-bit security or more:

- site identity: Ed25519 signatures (over the X25519 key advertisements);
- key agreement: X25519, then HKDF-SHA256 bound to a purpose and the round;
- shares in transit: AES-256-GCM, with the round and both site ids as associated data;
- masks: AES-256-CTR keystream from a 256-bit seed. Flower's SecAgg+ seeds numpy's
  Mersenne Twister with 32 bits of the shared key, so 2^32 guesses recover a mask; here no
  mask comes from a non-cryptographic generator or a seed shorter than 128 bits;
- Shamir t-of-k secret sharing over the prime field GF(2^256 + 297), which holds a 256-bit
  seed or X25519 private key in one element.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32  # 256-bit seeds and keys: above the 128-bit floor the issue sets
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# The smallest prime above 2^256, so a 256-bit secret is one field element.
SHAMIR_PRIME = 2**256 + 297
SHARE_VALUE_BYTES = 33  # enough bytes for any element of GF(SHAMIR_PRIME)
_NONCE_BYTES = 12


class CryptoError(ValueError):
    """A signature, ciphertext or share failed verification."""


# --- identity: Ed25519 -----------------------------------------------------------------


def new_identity() -> Ed25519PrivateKey:
    """A fresh Ed25519 site identity key."""
    return Ed25519PrivateKey.generate()


def identity_public_bytes(identity: Ed25519PrivateKey) -> bytes:
    return identity.public_key().public_bytes_raw()


def sign(identity: Ed25519PrivateKey, message: bytes) -> bytes:
    return identity.sign(message)


def verify(identity_public: bytes, message: bytes, signature: bytes) -> None:
    """Raise CryptoError unless `signature` is `identity_public`'s signature of `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except (InvalidSignature, ValueError) as error:
        raise CryptoError(f"bad Ed25519 signature ({error or 'does not verify'})") from None


# --- key agreement: X25519 + HKDF-SHA256 ------------------------------------------------


def new_agreement_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


@dataclass(frozen=True)
class RoundKeys:
    """A site's two X25519 keys for one round, never sent: `mask` agrees the pairwise masks,
    `share` the keys its shares travel under."""

    mask: X25519PrivateKey
    share: X25519PrivateKey

    @classmethod
    def new(cls) -> RoundKeys:
        return cls(new_agreement_key(), new_agreement_key())


def agreement_public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def agreement_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def agreement_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    """HKDF-SHA256 of `secret` to a 256-bit key bound to `purpose` (domain separation)."""
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
                info=b"fleetmind/secagg/" + purpose).derive(secret)


def agree(own: X25519PrivateKey, peer_public: bytes, purpose: bytes) -> bytes:
    """The 256-bit key both ends of an X25519 pair derive for `purpose`."""
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        # A low-order peer key yields an all-zero secret; OpenSSL refuses it.
        raise CryptoError(f"X25519 agreement refused: {error}") from None
    return derive_key(shared, purpose)


# --- shares in transit: AES-256-GCM -----------------------------------------------------


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext); `associated_data` is authenticated, not sent."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:],
                                   associated_data)
    except (InvalidTag, ValueError):
        raise CryptoError("AES-GCM authentication failed: wrong key, round or sender, "
                          "or a tampered ciphertext") from None


# --- masks: AES-256-CTR keystream -------------------------------------------------------


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 words from AES-256-CTR keyed by a 256-bit `seed`.

    Each seed is used once per round (fresh keys every round), so the all-zero counter
    block is a safe start.
    """
    if len(seed) != SEED_BYTES:
        raise CryptoError(f"mask seed has {len(seed)} bytes, need {SEED_BYTES}")
    keystream = bytearray(4 * length)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    # update_into writes the keystream of the zero buffer in place: no second copy.
    encryptor.update_into(keystream, keystream)
    return np.frombuffer(keystream, dtype="<u4")


def random_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


# --- Shamir t-of-k over GF(SHAMIR_PRIME) ------------------------------------------------


@dataclass(frozen=True)
class Share:
    """One point (x, y) of a Shamir polynomial; x is the holder's site id (never 0)."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 0 < self.x < 2**32:
            raise CryptoError(f"share x={self.x} outside 1..2^32-1")
        if not 0 <= self.y < SHAMIR_PRIME:
            raise CryptoError("share value outside the field")

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.x) + self.y.to_bytes(SHARE_VALUE_BYTES, "little")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        if len(raw) != 4 + SHARE_VALUE_BYTES:
            raise CryptoError(f"share has {len(raw)} bytes, need {4 + SHARE_VALUE_BYTES}")
        return cls(struct.unpack("<I", raw[:4])[0], int.from_bytes(raw[4:], "little"))


def split_secret(secret: bytes, threshold: int, holders: list[int]) -> dict[int, Share]:
    """Shares of `secret` for each holder id: any `threshold` of them rebuild it."""
    if len(secret) != SEED_BYTES:
        raise CryptoError(f"secret has {len(secret)} bytes, need {SEED_BYTES}")
    if not 1 <= threshold <= len(holders):
        raise CryptoError(f"threshold {threshold} not in 1..{len(holders)} holders")
    # Random coefficients from the OS CSPRNG: with fewer than `threshold` points every
    # secret stays equally likely.
    coefficients = [int.from_bytes(secret, "little")]
    coefficients += [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % SHAMIR_PRIME
        shares[x] = Share(x, y)
    return shares


def combine_shares(shares: list[Share], threshold: int) -> bytes:
    """Lagrange interpolation at 0 from at least `threshold` shares with distinct x."""
    points = {share.x: share.y for share in shares}
    if len(points) != len(shares):
        raise CryptoError("two shares have the same x")
    if len(points) < threshold:
        raise CryptoError(f"{len(points)} shares, need {threshold} to rebuild the secret")
    chosen = list(points.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(chosen):
            if i != j:
                numerator = numerator * x_j % SHAMIR_PRIME
                denominator = denominator * (x_j - x_i) % SHAMIR_PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    if secret >= 2 ** (8 * SEED_BYTES):
        raise CryptoError("shares do not rebuild a 256-bit secret: some share is wrong")
    return secret.to_bytes(SEED_BYTES, "little")
