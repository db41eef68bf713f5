"""Files that must survive kill -9 and power loss: the one atomic writer both sides use.

A reader sees the old file or the new one, never half of one: write a temporary file in
the same directory (same filesystem, so rename is atomic) under a name no other writer
picks, fsync it, rename it over the target, then fsync the directory so the rename itself
is on disk (ext4/xfs may otherwise lose the new directory entry on power loss).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "write_folder", "write_synced"]


def fsync_dir(path: Path) -> None:
    """Flushes `path`'s directory entries (a rename, link or new file in it) to disk."""
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
    """Writes `path` atomically and durably. With replace=False an existing file is an
    error (FileExistsError), checked at the link, so of two writers racing to create the
    same file exactly one wins and the other's bytes never appear."""
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


def write_folder(target: Path, contents: Mapping[str, bytes], partial: Path) -> None:
    """Writes folder `target` (file name -> bytes) whole or not at all: every file synced
    inside `partial` (a fresh name in the same directory), renamed to `target` (a rename
    onto an existing non-empty folder fails, so of two writers one wins), then the parent
    synced. `partial` is removed if anything fails."""
    partial.mkdir()
    try:
        for name, data in contents.items():
            write_synced(partial / name, data)
        fsync_dir(partial)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_dir(target.parent)
