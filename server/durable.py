"""Files that must survive kill -9 and power loss: atomic writes, fsync, canonical JSON.

A reader sees the old file or the new one, never half of one: write a temporary file in
the same directory (same filesystem, so rename is atomic), fsync it, rename it over the
target, then fsync the directory so the rename itself is on disk (ext4/xfs may otherwise
lose the new directory entry on power loss).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Creates `path` (which must not exist) with `mode` from the first byte, and fsyncs it:
    a private key is never readable by others, not even for an instant."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, replace: bool = True) -> None:
    """Writes `path` atomically. With replace=False an existing file is an error
    (FileExistsError), checked at the rename, so two writers cannot both win."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    write_synced(partial, data, mode)
    try:
        if replace:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # fails if `path` exists, unlike rename
            os.unlink(partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def canonical_json(value: Any) -> bytes:
    """The one byte string a JSON value signs and hashes as: sorted keys, no spaces, ASCII,
    no NaN or infinity (which JSON cannot carry and Python would write anyway)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()
