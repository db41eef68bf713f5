"""Where the signed records lie on disk: the names the side that writes them and the
auditor who reads them must agree on, and reading a version folder back.

    OUTBOX_FILE   the site's outbox (client/outbox.py), in the site's data folder
    LEDGER_FILE   the aggregator's ledger (server/ledger.py), in its data folder
    VERSIONS      the folder of the site's verified versions (client/versions.py), one
                  subfolder per version

`verify_folder` checks a version folder on disk with aggregation.manifest (signature,
every file's hash, nothing extra): the check a site makes before activating a version and
the one `fleetmind audit version` makes, with the same code.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleetmind.aggregation.manifest import MANIFEST, SIGNATURE, Manifest, verify_manifest

__all__ = ["LEDGER_FILE", "OUTBOX_FILE", "VERSIONS", "verify_folder"]

OUTBOX_FILE = "outbox.sqlite"
LEDGER_FILE = "ledger.sqlite"
VERSIONS = "versions"


def verify_folder(folder: Path, public_key: Ed25519PublicKey | bytes) -> Manifest:
    """Checks a version folder on disk (signature, every hash, nothing extra)."""
    folder = Path(folder)
    files: dict[str, bytes] = {}
    for path in folder.iterdir():
        files[path.name] = path.read_bytes() if path.is_file() else b""
    manifest_bytes, signature = files.pop(MANIFEST, b""), files.pop(SIGNATURE, b"")
    return verify_manifest(manifest_bytes, signature, public_key, files, source=str(folder))
