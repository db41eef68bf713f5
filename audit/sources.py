"""Where an audit's evidence comes from: keys, the stored logs, the aggregator's Audit service.

The auditor holds no private key and must change nothing it reads, so the logs are read
here with a read-only SQLite connection rather than through `Ledger`/`Outbox`, which take
the owner's signing key and open their file for appending (creating it when absent). What
is read is only handed on: every check is the owning module's (`server.ledger`,
`client.outbox`, `client.versions`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.chain import ChainEntry

# The site's own parser of the aggregator key (raw, hex or PEM), so the auditor accepts
# exactly the files a site's `aggregator_key` setting does; and its loopback rule, so
# plaintext is refused off this machine just as a site refuses it.
from fleetmind.client.site import is_loopback, public_key_bytes, split_address

if TYPE_CHECKING:
    import grpc

__all__ = ["LogError", "Tls", "aggregator_key", "audit_channel", "read_log", "site_key"]

_COLUMNS = "idx, prev_hash, body, hash, signature"  # the ledger's and the outbox's schema


class LogError(ValueError):
    """A log file cannot be read at all (missing, not SQLite, not a fleetmind log)."""


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder; pass the key file") from None
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot read it ({error.strerror})") from None


def aggregator_key(path: Path) -> bytes:
    """The aggregator's Ed25519 public key as 32 raw bytes, from a file holding it raw, as
    64 hex digits or as PEM (what a site's `aggregator_key` accepts). Raises ValueError."""
    return public_key_bytes(_read_key_file(path, "aggregator key"), str(path))


def site_key(path: Path) -> bytes:
    """A site's Ed25519 public key as 32 raw bytes: from its public key (raw, hex, PEM), or
    from the site's PEM identity key, of which only the public half is kept (the operator
    auditing their own site holds that file, not a separate public key)."""
    raw = _read_key_file(path, "site key")
    if b"PRIVATE KEY-----" in raw:
        try:
            key = serialization.load_pem_private_key(raw.strip(), password=None)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: unreadable PEM private key ({error})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 site key")
        return key.public_key().public_bytes_raw()
    return public_key_bytes(raw, str(path))


def read_log(path: Path) -> list[ChainEntry]:
    """Every entry of a ledger or outbox file, in stored order, read without writing.
    Raises LogError when the file is missing or is not such a log."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"{path}: no such file" if not path.exists() else
                       f"{path} is not a file")
    # mode=ro: the auditor never writes an entry, creates, migrates or checkpoints the
    # owner's file (SQLite may add the -wal/-shm side files it needs to read a WAL database
    # while the owner appends). Where even those cannot be made (a read-only copy), the
    # file is read as immutable: nobody is appending to it there.
    rows = None
    for mode in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)
        except sqlite3.Error as error:
            raise LogError(f"{path}: cannot open it read-only ({error})") from None
        try:
            rows = db.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY idx").fetchall()
            break
        except sqlite3.OperationalError as error:
            if "no such table" in str(error) or mode == "immutable=1":
                raise LogError(f"{path} is not a fleetmind ledger or outbox ({error})") \
                    from None
        except sqlite3.DatabaseError as error:
            raise LogError(f"{path} is not a fleetmind ledger or outbox ({error})") from None
        finally:
            db.close()
    assert rows is not None
    # Types are not trusted either: a cell of the wrong type is a bad entry for the chain
    # check to name, so it becomes empty bytes rather than an exception here.
    return [ChainEntry(int(row[0]) if isinstance(row[0], int) else -1,
                       *(bytes(cell) if isinstance(cell, bytes | bytearray | memoryview)
                         else b"" for cell in row[1:]))
            for row in rows]


@dataclass(frozen=True)
class Tls:
    """mTLS to the aggregator, as a site has it: the fleet CA, a certificate and its key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def audit_channel(address: str, *, insecure: bool = False, tls: Tls | None = None
                  ) -> grpc.Channel:
    """A channel to the aggregator: mTLS, or plaintext only to a loopback address (the rule
    sites follow). Raises ValueError naming what is missing or refused."""
    import grpc

    host, _ = split_address(address)
    if insecure and tls is not None:
        raise ValueError("both --insecure and --ca/--cert/--key given: pick one (mTLS for any "
                         "real aggregator)")
    if insecure:
        if not is_loopback(host):
            raise ValueError(f"plaintext refused to {address}: --insecure is only for a "
                             "loopback aggregator (127.0.0.1, ::1, localhost); pass --ca, "
                             "--cert and --key")
        return grpc.insecure_channel(address)
    if tls is None:
        raise ValueError(f"no credentials for {address}: pass --ca, --cert and --key (a "
                         "certificate the fleet's CA issued), or --insecure for a loopback "
                         "aggregator")
    files = {}
    for flag, path in (("--ca", tls.ca_certificate), ("--cert", tls.certificate),
                       ("--key", tls.private_key)):
        try:
            files[flag] = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{flag} {path}: {error.strerror or error}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=files["--ca"],
                                               private_key=files["--key"],
                                               certificate_chain=files["--cert"])
    return grpc.secure_channel(address, credentials)
