"""The files of a party that dials the aggregator over mTLS (a site, an auditor): the
fleet CA that signed the aggregator's certificate, and its own certificate and key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fleetmind.runtime.config import ConfigError

__all__ = ["TlsFiles"]


@dataclass(frozen=True)
class TlsFiles:
    """mTLS to the aggregator: the fleet CA, and this party's certificate and key."""

    ca_certificate: Path
    certificate: Path
    private_key: Path

    def read(self, names: Mapping[str, str] | None = None) -> tuple[bytes, bytes, bytes]:
        """(CA certificate, private key, certificate) PEM, the order
        grpc.ssl_channel_credentials takes them. Raises ConfigError naming the file that
        cannot be read, as `names` calls the field (default: tls.<field>)."""
        contents: dict[str, bytes] = {}
        for field in ("ca_certificate", "certificate", "private_key"):
            path = getattr(self, field)
            try:
                contents[field] = Path(path).read_bytes()
            except OSError as error:
                name = (names or {}).get(field, f"tls.{field}")
                raise ConfigError(f"{name} {path}: {error.strerror or error}") from None
        return contents["ca_certificate"], contents["private_key"], contents["certificate"]
