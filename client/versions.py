"""The site's copy of the global adapter: download, verify, activate, roll back.

Layout under the site folder:

    versions/<version, 8 digits>/   a verified version: adapter_config.json,
                                    adapter_model.safetensors, manifest.json, manifest.sig
    current  -> versions/<n>        the active version (what serving loads)
    previous -> versions/<m>        the last good version before it (what rollback restores)

Nothing reaches `versions/` unverified: every chunk is checked against its sha256 as it
arrives (a bad chunk is fetched again from its offset), then the manifest's Ed25519
signature and every file's sha256 are checked with aggregation.manifest, the same code the
aggregator publishes with, and only then is the folder written (under a temporary name,
fsynced, renamed into place). Activation flips a symlink with rename(2), so a reader (or a
crash) sees the old version or the new one, never a mix. The links are relative, so the
site folder can be moved.

Activation only moves forward and always verifies (docs/hardening.md):

    aggregator.pub   the key download_latest verified with: activate's key when none is
                     passed; with neither, activation is refused
    rollback.json    written by `rollback`: the version rolled back from. Until a version
                     newer than it is published, download_latest and activate refuse it
                     and everything older, so the site loop's next refresh cannot undo an
                     operator's rollback; a newer version clears it

A version older than the active one is refused (a downgrade: an old signed version
announced as latest), and so is one whose B is not finite, is larger than MAX_ABS_B
anywhere, or moved further than the manifest's clip and noise allow from its parent when
the parent is here (`check_norms`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from cryptography.exceptions import InvalidSignature
from safetensors.numpy import load as load_safetensors

from fleetmind.aggregation.manifest import (
    ADAPTER_WEIGHTS,
    MANIFEST,
    SIGNATURE,
    Manifest,
    VersionError,
    verify_manifest,
)
from fleetmind.aggregation.manifest import (
    public_key as load_public_key,
)
from fleetmind.protos.fleetmind.v1 import models_pb2, models_pb2_grpc
from fleetmind.runtime.durable import atomic_write, fsync_dir, write_folder
from fleetmind.runtime.layout import VERSIONS, verify_folder

CURRENT = "current"
PREVIOUS = "previous"
TRUSTED_KEY = "aggregator.pub"
ROLLBACK_PIN = "rollback.json"
# A LoRA B entry beyond this is no honest round's (honest rounds: |B| < 1; the poisoned
# version the adversarial review published had max |B| ~ 3e6).
MAX_ABS_B = 1e3
# The step from the parent, in clips: ||B - B_parent|| <= MAX_STEP_CLIPS * C * max(1, z *
# sqrt(d)). Loose on purpose (the manifest does not say the cohort's units or weights);
# the aggregator's own check (server/coordinator.py, _check_aggregate) is the tight one.
MAX_STEP_CLIPS = 1000.0
MAX_FILE_BYTES = 2 << 30  # no adapter is this large; more is a broken or hostile server
CHUNK_RETRIES = 3  # bad chunks refetched per file before the download is refused
_FOLDER = re.compile(r"\d{8}")
_PARTIAL_PREFIX = ".partial-"
# Get's refusals that say "this version is not servable", not "the network hiccupped".
_REFUSALS = (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT)

__all__ = [
    "RollbackError",
    "VersionError",
    "activate",
    "check_norms",
    "current_version",
    "download_latest",
    "previous_version",
    "rollback",
    "rollback_pin",
]


class RollbackError(RuntimeError):
    """There is no earlier good version to return to (nothing was activated before the
    current one, or it was already rolled back)."""


# ---- download -------------------------------------------------------------------------


def download_latest(channel: grpc.Channel, into: Path, public_key: bytes,
                    timeout: float = 60.0, max_chunk_bytes: int = 0) -> Path:
    """Downloads the aggregator's newest version into `into/versions/<n>/` (`into` is the
    site folder) and returns that folder, verified but not activated: pass it to
    `activate`. A version already downloaded and still intact is not fetched again.
    `public_key` is the aggregator's raw Ed25519 key (EnrollReply.aggregator_key).

    Raises VersionError for anything unsigned, tampered with or malformed (nothing is
    written), and grpc.RpcError when the aggregator cannot be reached."""
    key = load_public_key(public_key)
    models = models_pb2_grpc.ModelsStub(channel)
    try:
        announcement = models.Latest(models_pb2.LatestRequest(), timeout=timeout)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            raise VersionError("the aggregator has published no version yet; try again "
                               "after genesis") from None
        if error.code() in _REFUSALS:
            raise VersionError(f"the aggregator refused to announce its latest version "
                               f"({error.code().name}: {error.details()}); keep the current "
                               "one") from None
        raise
    # Check the signature before downloading anything (models.proto): an unsigned or
    # forged announcement costs no transfer.
    if not announcement.manifest or not announcement.manifest_sig:
        raise VersionError(f"version {announcement.version} is unsigned: the announcement "
                           f"lacks {MANIFEST} or {SIGNATURE}; do not activate it")
    try:
        key.verify(announcement.manifest_sig, announcement.manifest)
    except InvalidSignature:
        raise VersionError(f"version {announcement.version}: {SIGNATURE} does not verify with "
                           "the aggregator key; the manifest was altered or signed by someone "
                           "else") from None
    manifest = Manifest.from_bytes(announcement.manifest)
    if manifest.version != announcement.version:
        raise VersionError(f"the announcement says version {announcement.version} but its "
                           f"signed manifest is version {manifest.version}")
    _record_key(Path(into), public_key)
    _check_forward(Path(into), manifest.version)

    versions = Path(into) / VERSIONS
    target = versions / f"{manifest.version:08d}"
    if target.is_dir():
        try:
            verify_folder(target, key)
            return target  # already here and intact
        except VersionError:
            if _linked(Path(into), target):
                raise VersionError(f"{target} is active but no longer verifies: roll back "
                                   "(`fleetmind client rollback --site DIR`), then download "
                                   "again") from None
            shutil.rmtree(target)  # a damaged, inactive copy: fetch it afresh

    files = {name: _fetch(models, manifest.version, name, digest, timeout, max_chunk_bytes)
             for name, digest in sorted(manifest.files.items())}
    verify_manifest(announcement.manifest, announcement.manifest_sig, key, files,
                    source=f"version {manifest.version} as downloaded")
    _write_version(target, {**files, MANIFEST: announcement.manifest,
                            SIGNATURE: announcement.manifest_sig})
    return target


def _fetch(models: models_pb2_grpc.ModelsStub, version: int, name: str, digest: str,
           timeout: float, max_chunk_bytes: int) -> bytes:
    """One file, chunk by chunk, each checked on arrival. A bad or missing chunk is fetched
    again from its offset (Get resumes), up to CHUNK_RETRIES times per file."""
    data = bytearray()
    total: int | None = None
    retries = 0
    while total is None or len(data) < total:
        request = models_pb2.GetRequest(version=version, file=name, offset=len(data),
                                        max_chunk_bytes=max_chunk_bytes)
        stream = models.Get(request, timeout=timeout)
        problem: _Problem | None = None
        try:
            for chunk in stream:
                problem = _check_chunk(chunk, version, name, digest, len(data), total)
                if problem is not None:
                    break
                total = chunk.total_bytes
                data += chunk.data
                if len(data) >= total:
                    break
            else:
                if total is None or len(data) < total:
                    problem = _Problem(f"the stream ended at byte {len(data)} of "
                                       f"{'?' if total is None else total}")
        except grpc.RpcError as error:
            if error.code() in _REFUSALS:  # the aggregator will not serve it: a bad version
                raise VersionError(f"version {version} {name}: the aggregator refused it "
                                   f"({error.code().name}: {error.details()}); do not "
                                   "activate it") from None
            raise
        finally:
            stream.cancel()  # harmless once finished; ends a stream we stopped trusting
        if problem is None:
            continue
        if problem.fatal:  # not a transfer error: refetching cannot fix it
            raise VersionError(f"version {version} {name}: {problem.message}; do not "
                               "activate it")
        retries += 1
        if retries > CHUNK_RETRIES:
            raise VersionError(f"version {version} {name}: {problem.message}, still after "
                               f"{CHUNK_RETRIES} refetches; the aggregator or the network is "
                               "corrupting it; refusing the version")
    return bytes(data)


@dataclass(frozen=True)
class _Problem:
    message: str
    fatal: bool = False  # True: the server means it, so fetching again cannot help


def _check_chunk(chunk: models_pb2.FileChunk, version: int, name: str, digest: str,
                 have: int, total: int | None) -> _Problem | None:
    """Why `chunk` cannot be taken, or None."""
    if chunk.version != version or chunk.file != name:
        return _Problem(f"the aggregator sent version {chunk.version} {chunk.file!r} when "
                        "asked for this file", fatal=True)
    if chunk.file_sha256.hex() != digest:
        return _Problem("the aggregator serves a file whose sha256 is not the one the "
                        "manifest signs", fatal=True)
    if chunk.total_bytes > MAX_FILE_BYTES:
        return _Problem(f"the file claims {chunk.total_bytes} bytes, more than "
                        f"{MAX_FILE_BYTES}", fatal=True)
    if total is not None and chunk.total_bytes != total:
        return _Problem(f"the file's size changed mid-download ({total} then "
                        f"{chunk.total_bytes})", fatal=True)
    if chunk.offset != have:
        return _Problem(f"a chunk came at offset {chunk.offset}, expected {have}")
    if hashlib.sha256(chunk.data).digest() != chunk.chunk_sha256:
        return _Problem(f"the chunk at offset {chunk.offset} does not match its sha256")
    if have + len(chunk.data) > chunk.total_bytes:
        return _Problem(f"the chunk at offset {chunk.offset} runs past the file's end")
    if not chunk.data and have < chunk.total_bytes:
        return _Problem(f"an empty chunk at offset {chunk.offset} before the file's end")
    return None


def _write_version(target: Path, contents: Mapping[str, bytes]) -> None:
    """Writes a whole version folder or none: temporary name, fsync, rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f"{_PARTIAL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a download a crash cut short
    write_folder(target, contents,
                 target.parent / f"{_PARTIAL_PREFIX}{target.name}-{secrets.token_hex(4)}")


# ---- activation -----------------------------------------------------------------------


def activate(site_dir: Path, version_dir: Path, public_key: bytes | None = None,
             model_dir: Path | None = None) -> int:
    """Makes `version_dir` (a folder under site_dir/versions/, as download_latest returns)
    the current version and keeps the one it replaces as `previous`. The folder is always
    verified first, with `public_key` or else the key download_latest recorded (neither:
    refused), and its norms checked (`check_norms`). Refuses a version older than the
    active one, and one a rollback pinned out. With `model_dir` (the site's base model),
    a version whose manifest names another base model's sha256 is refused before any link
    moves (`model.check_base_model`). Returns the activated version number."""
    site_dir = Path(site_dir)
    version_dir = Path(version_dir)
    number = _version_number(site_dir, version_dir)
    key = public_key if public_key is not None else _recorded_key(site_dir)
    if key is None:
        raise VersionError(f"no aggregator key to verify {version_dir} with: pass the "
                           "aggregator's public key (EnrollReply.aggregator_key), or download "
                           "with download_latest, which records it")
    manifest = verify_folder(version_dir, key)
    if manifest.version != number:
        raise VersionError(f"{version_dir} holds version {manifest.version}, not {number}")
    if model_dir is not None:
        from fleetmind.client.model import check_base_model

        check_base_model(manifest, model_dir)
    current = _target(site_dir, CURRENT)
    if current == version_dir.name:
        return number
    _check_forward(site_dir, number)
    check_norms(site_dir, version_dir, manifest)
    # previous first: a crash between the two flips leaves previous == current, which
    # rollback treats as "nothing to roll back to", never as a wrong version.
    if current is not None:
        _flip(site_dir, PREVIOUS, current)
    _flip(site_dir, CURRENT, version_dir.name)
    (site_dir / ROLLBACK_PIN).unlink(missing_ok=True)  # _check_forward passed: newer than it
    return number


def _check_forward(site_dir: Path, number: int) -> None:
    """Refuses a downgrade (older than the active version) and, after a rollback, the
    version rolled back from and anything older, until a newer one is published."""
    current = _target(site_dir, CURRENT)
    if current is not None and number < int(current):
        raise VersionError(f"version {number} is older than the active version "
                           f"{int(current)}: versions only move forward (an operator rolls "
                           "back with `fleetmind client rollback`)")
    pinned = rollback_pin(site_dir)
    if pinned is not None and number <= pinned:
        raise VersionError(f"version {number}: an operator rolled back from version "
                           f"{pinned}; this site waits for a version newer than {pinned}")


def rollback_pin(site_dir: Path) -> int | None:
    """The version an operator rolled back from, while no newer one was activated."""
    try:
        return int(json.loads((Path(site_dir) / ROLLBACK_PIN).read_bytes())["from"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise VersionError(f"{Path(site_dir) / ROLLBACK_PIN} is unreadable; write "
                           '{"from": <version rolled back from>} or remove it') from None


def check_norms(site_dir: Path, version_dir: Path, manifest: Manifest) -> None:
    """Refuses a version whose B holds a non-finite value or one beyond MAX_ABS_B, or, when
    its parent is here, moved from it by more than MAX_STEP_CLIPS * C * max(1, z*sqrt(d))."""
    b = _read_b(version_dir / ADAPTER_WEIGHTS)
    for name, tensor in b.items():
        if not np.isfinite(tensor).all():
            raise VersionError(f"version {manifest.version}: {name} holds non-finite values; "
                               "do not activate it")
        peak = float(np.abs(tensor).max(initial=0.0))
        if peak > MAX_ABS_B:
            raise VersionError(f"version {manifest.version}: {name} reaches |B| = {peak:.4g}, "
                               f"beyond {MAX_ABS_B:g}: a poisoned or broken version")
    parent = None if manifest.parent is None else \
        Path(site_dir) / VERSIONS / f"{manifest.parent:08d}"
    if parent is None or not (parent / ADAPTER_WEIGHTS).is_file():
        return
    before = _read_b(parent / ADAPTER_WEIGHTS)
    if set(before) != set(b):
        raise VersionError(f"version {manifest.version} has other modules than its parent "
                           f"{manifest.parent}")
    d = sum(t.size for t in b.values())
    step = math.sqrt(sum(float(np.sum((b[n].astype(np.float64) - before[n]) ** 2))
                         for n in b))
    bound = MAX_STEP_CLIPS * manifest.clip_norm * max(1.0, manifest.noise_multiplier
                                                      * math.sqrt(d))
    if not step <= bound:
        raise VersionError(f"version {manifest.version} moved B by {step:.4g} from version "
                           f"{manifest.parent}, beyond the {bound:.4g} its clip and noise "
                           "allow: do not activate it")


def _read_b(path: Path) -> dict[str, np.ndarray]:
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as error:  # safetensors raises its own error types
        raise VersionError(f"{path} does not load as safetensors: {error}") from None
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()
            if k.endswith(".lora_B.weight")}


def _record_key(site_dir: Path, public_key: bytes) -> None:
    """Keeps the key download_latest verifies with, for activate() called without one."""
    path = site_dir / TRUSTED_KEY
    raw = bytes(public_key)
    if path.is_file() and path.read_bytes() == raw:
        return
    site_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, raw)


def _recorded_key(site_dir: Path) -> bytes | None:
    try:
        return (site_dir / TRUSTED_KEY).read_bytes()
    except FileNotFoundError:
        return None


def rollback(site_dir: Path) -> tuple[int, int]:
    """Flips `current` back to `previous` (the last good version) and forgets `previous`,
    so the version rolled back from is never restored by a second rollback. Returns
    (from version, to version). Raises RollbackError when there is nothing to return to."""
    site_dir = Path(site_dir)
    current, previous = _target(site_dir, CURRENT), _target(site_dir, PREVIOUS)
    if current is None:
        raise RollbackError(f"{site_dir} has no active version; download and activate one "
                            "first")
    if previous is None or previous == current or not (site_dir / PREVIOUS).is_dir():
        raise RollbackError(f"{site_dir}: version {int(current)} is active and no earlier "
                            "good version is kept (nothing to roll back to)")
    # The pin first: a crash after it and before the flip leaves the old version active
    # and pinned out of re-activation, which a newer version or a second rollback clears.
    atomic_write(site_dir / ROLLBACK_PIN, json.dumps(
        {"from": max(int(current), rollback_pin(site_dir) or 0), "to": int(previous)}).encode())
    _flip(site_dir, CURRENT, previous)
    (site_dir / PREVIOUS).unlink()
    fsync_dir(site_dir)
    return int(current), int(previous)


def current_version(site_dir: Path) -> int | None:
    """The active version's number, or None before the first activation."""
    target = _target(Path(site_dir), CURRENT)
    return None if target is None else int(target)


def previous_version(site_dir: Path) -> int | None:
    """The version a rollback would restore, or None."""
    site_dir = Path(site_dir)
    target, current = _target(site_dir, PREVIOUS), _target(site_dir, CURRENT)
    return None if target is None or target == current else int(target)


def _version_number(site_dir: Path, version_dir: Path) -> int:
    if version_dir.parent.resolve() != (site_dir / VERSIONS).resolve() or \
            not _FOLDER.fullmatch(version_dir.name) or not version_dir.is_dir():
        raise VersionError(f"{version_dir} is not a version folder of {site_dir} (expected "
                           f"{site_dir / VERSIONS}/<8 digits>/, as download_latest returns)")
    return int(version_dir.name)


def _target(site_dir: Path, link: str) -> str | None:
    """The version folder name `link` points at, or None when absent."""
    try:
        target = os.readlink(site_dir / link)
    except FileNotFoundError:
        return None
    parts = Path(target).parts
    if len(parts) != 2 or parts[0] != VERSIONS or not _FOLDER.fullmatch(parts[1]):
        raise VersionError(f"{site_dir / link} points at {target!r}, not {VERSIONS}/<8 "
                           "digits>: something other than fleetmind changed it; fix or "
                           "remove the link")
    return parts[1]


def _linked(site_dir: Path, folder: Path) -> bool:
    return folder.name in (_target(site_dir, CURRENT), _target(site_dir, PREVIOUS))


def _flip(site_dir: Path, link: str, folder_name: str) -> None:
    """Points `site_dir/link` at versions/<folder_name> atomically: a new symlink under a
    temporary name, renamed over the old one (rename(2) replaces the link itself)."""
    temporary = site_dir / f".{link}-{secrets.token_hex(4)}"
    os.symlink(Path(VERSIONS) / folder_name, temporary)
    try:
        os.replace(temporary, site_dir / link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(site_dir)

