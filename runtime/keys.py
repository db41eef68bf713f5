"""Ed25519 keys as operators hand them over: a public key as 32 raw bytes, 64 hex digits
or PEM; a private key as 32 raw bytes or unencrypted PKCS#8 PEM. One parser, so a site's
`aggregator_key`, the auditor's --aggregator-key and --site-key accept the same files."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fleetmind.runtime.config import ConfigError

__all__ = ["private_key_from_bytes", "public_key_bytes", "read_key_file"]


def public_key_bytes(raw: bytes, source: str, *, private_ok: bool = False) -> bytes:
    """The Ed25519 public key in `raw` as 32 raw bytes: raw, 64 hex digits (surrounding
    white space allowed) or PEM. With `private_ok`, a PEM private key is accepted too and
    only its public half is kept (an operator auditing their own site holds that file).
    `source` names where `raw` came from in the error. Raises ConfigError (a ValueError)."""
    raw = bytes(raw)
    text = raw.strip()
    if len(raw) == 32:
        return raw
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except (ValueError, UnicodeDecodeError):
            pass
    if b"PRIVATE KEY-----" in raw:
        if not private_ok:
            raise ConfigError(f"{source} holds a private key: pass the public key (never "
                              "hand a private key to another party)")
        return private_key_from_bytes(raw, source).public_key().public_bytes_raw()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as error:
            raise ConfigError(f"{source}: unreadable PEM ({error})") from None
        if isinstance(key, Ed25519PublicKey):
            return key.public_bytes_raw()
    raise ConfigError(f"{source}: not an Ed25519 public key (32 raw bytes, 64 hex digits or "
                      "PEM); take it from the key's owner")


def private_key_from_bytes(raw: bytes, source: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from 32 raw bytes or unencrypted PEM. Raises ConfigError."""
    if len(raw) == 32:
        return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        key = serialization.load_pem_private_key(raw.strip(), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: not a raw or unencrypted PEM private key ({error})") \
            from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{source} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def read_key_file(path: Path, what: str) -> bytes:
    """The bytes of key file `path`; `what` names it in the error. Raises ConfigError."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; pass the key file") from None
    except OSError as error:
        raise ConfigError(f"{what} {path}: cannot read it ({error.strerror})") from None
