"""The site's Ed25519 identity key: what signs its enrolment and its outbox."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.runtime.config import ConfigError
from fleetmind.runtime.durable import atomic_write
from fleetmind.runtime.keys import private_key_from_bytes

__all__ = ["load_identity_key"]


def load_identity_key(path: Path, create: bool = True) -> Ed25519PrivateKey:
    """The site's Ed25519 identity (32 raw bytes or PKCS#8 PEM). Absent and `create`: a new
    key is written as PEM, mode 0600, atomically (a temporary file hard-linked into place,
    so two agents starting at once end with the same single key)."""
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        # link(2) refuses to replace: if another process created the key first, keep it.
        with contextlib.suppress(FileExistsError):
            atomic_write(path, pem, 0o600, replace=False)
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"identity key {path} does not exist; create it or let the agent "
                          "create it") from None
    if mode & 0o077:
        raise ConfigError(f"identity key {path} is readable by others (mode {mode & 0o777:o}); "
                          f"run `chmod 600 {path}`")
    return private_key_from_bytes(raw, f"identity key {path}")
