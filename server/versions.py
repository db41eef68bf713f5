"""The signed version registry: every global adapter the aggregator has published.

A version is a folder, `versions/<version, 8 digits>/`, holding a standard PEFT LoRA
adapter (`adapter_config.json`, `adapter_model.safetensors` with A and B under PEFT's key
names) that `peft` and vLLM load as it is, plus `manifest.json` (what the version is and
how it was made, with the sha256 of every other file) and `manifest.sig` (Ed25519 by the
aggregator key over the manifest's exact bytes). A site that verifies the signature and
the hashes knows every byte it activates came from the aggregator.

A is frozen from the public seed (FFA-LoRA, arXiv 2403.12313; `aggregation.frozen_a`), so
version 0 (genesis) has B = 0 and every later version copies A from its parent and
carries the new B. Publishing is atomic: the folder is written under a temporary name,
every file and the folder fsynced, then renamed into place; a crash leaves either no
version or a whole one, and leftovers are swept at the next start. The server holds no
torch: tensors are numpy, written with `safetensors.numpy`.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fleetmind.aggregation.frozen_a import frozen_a

# The manifest's format and check live in aggregation/manifest.py, shared with the sites;
# re-exported here so the registry's callers keep one import.
from fleetmind.aggregation.manifest import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_ALPHA,
    DEFAULT_RANK,
    FORMAT,
    MANIFEST,
    SIGNATURE,
    Manifest,
    NoiseMode,
    VersionError,
    check_release,
    peft_adapter_config,
    verify_manifest,
)
from fleetmind.aggregation.manifest import SHA256_HEX as _SHA256
from fleetmind.aggregation.manifest import public_key as _public  # noqa: F401 (tests use it)
from fleetmind.runtime.durable import write_folder
from fleetmind.runtime.signed_log import canonical_json
from fleetmind.server.waiters import Waiters

PEFT_PREFIX = "base_model.model."
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_FOLDER = re.compile(r"\d{8}")
_PARTIAL_PREFIX = ".partial-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_keys(module: str) -> tuple[str, str]:
    """PEFT's safetensors keys of A and B for `module` (e.g. model.layers.0.mlp.gate_proj)."""
    return (f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight")


@dataclass(frozen=True)
class TargetModule:
    """One adapted linear layer of the base model: A is (rank, in), B is (out, rank)."""

    name: str
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if not _MODULE.fullmatch(self.name):
            raise ValueError(f"module name {self.name!r} must be a dotted module path such "
                             "as model.layers.0.mlp.gate_proj")
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"{self.name}: in_features={self.in_features} and "
                             f"out_features={self.out_features} must be positive")


@dataclass(frozen=True)
class AdapterSpec:
    """What the genesis adapter adapts: the base model and the modules' shapes."""

    base_model_id: str
    base_model_sha256: str
    modules: tuple[TargetModule, ...]
    frozen_a_seed: int
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    # The layers are Conv1D (GPT-2), whose weight is stored (in, out): PEFT must transpose.
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", tuple(self.modules))
        if not self.base_model_id:
            raise ValueError("base_model_id is empty: name the base model (a hub id or path)")
        if not _SHA256.fullmatch(self.base_model_sha256):
            raise ValueError(f"base_model_sha256={self.base_model_sha256!r} must be 64 "
                             "lowercase hex digits")
        if not self.modules:
            raise ValueError("no target modules: name at least one linear layer to adapt")
        names = [module.name for module in self.modules]
        if len(set(names)) != len(names):
            repeated = sorted(name for name in set(names) if names.count(name) > 1)
            raise ValueError(f"target modules repeat: {repeated}")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha={self.alpha} must be finite and > 0")
        if not 0 <= self.frozen_a_seed < 2**63:
            raise ValueError(f"frozen_a_seed={self.frozen_a_seed} must be in 0..2^63-1")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out={self.fan_in_fan_out!r} must be true or false")

    def adapter_config(self) -> dict:
        """PEFT's adapter_config.json (aggregation.manifest.peft_adapter_config): target
        modules are the full module paths, so the adapter lands on these layers only."""
        return peft_adapter_config(self.base_model_id, self.rank, self.alpha,
                                   [module.name for module in self.modules],
                                   self.fan_in_fan_out)


@dataclass(frozen=True)
class Release:
    """How a round made its version: what goes into the manifest besides the files."""

    round_id: int
    cohort_size: int
    clip_norm: float
    noise_multiplier: float
    noise_mode: NoiseMode
    epsilon: float  # total spent after this round, at `delta`
    delta: float
    secure_aggregation: bool = True  # False: summed unmasked (the loopback-only ablation)

    def __post_init__(self) -> None:
        check_release(self.round_id, self.cohort_size, self.clip_norm, self.noise_multiplier,
                      self.noise_mode, self.epsilon, self.delta, genesis=False,
                      secure_aggregation=self.secure_aggregation)


@dataclass(frozen=True)
class Version:
    """A published, verified version on disk."""

    folder: Path
    manifest: Manifest

    @property
    def number(self) -> int:
        return self.manifest.version

    def manifest_bytes(self) -> bytes:
        return (self.folder / MANIFEST).read_bytes()

    def signature(self) -> bytes:
        return (self.folder / SIGNATURE).read_bytes()

    def manifest_sha256(self) -> str:
        """The version's hash for the ledger: its manifest lists every other file's hash."""
        return hashlib.sha256(self.manifest_bytes()).hexdigest()

    def tensors(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(A, B) per module name, float32."""
        return read_lora(self.folder / ADAPTER_WEIGHTS)


def read_lora(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    raw = load_safetensors(Path(path).read_bytes())
    a: dict[str, np.ndarray] = {}
    b: dict[str, np.ndarray] = {}
    for key, tensor in raw.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight",
                                                                  ".lora_B.weight")):
            raise VersionError(f"{path.name}: unexpected tensor {key!r}; a version holds only "
                               "PEFT LoRA A and B")
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        (a if key.endswith(".lora_A.weight") else b)[module] = tensor
    if set(a) != set(b):
        raise VersionError(f"{path.name}: modules without both A and B: "
                           f"{sorted(set(a) ^ set(b))}")
    return a, b


def verify(folder: Path, public_key: Ed25519PublicKey | bytes) -> Manifest:
    """Checks a version folder before anyone activates it: the signature over manifest.json,
    the manifest itself, every file's sha256, and that the folder holds nothing else.
    Raises VersionError naming what failed; returns the manifest. The checks themselves are
    aggregation.manifest.verify_manifest, the same ones a site runs on a download."""
    folder = Path(folder)
    manifest_path, signature_path = folder / MANIFEST, folder / SIGNATURE
    if not manifest_path.is_file() or not signature_path.is_file():
        raise VersionError(f"{folder} is unsigned: {MANIFEST} and {SIGNATURE} must both be "
                           "present; do not activate it")
    files = {}
    for path in folder.iterdir():
        if path.name in (MANIFEST, SIGNATURE):
            continue
        # A subfolder is never part of a version: an empty stand-in makes it "not in the
        # manifest" (or a hash mismatch) rather than an unreadable-file crash.
        files[path.name] = path.read_bytes() if path.is_file() else b""
    return verify_manifest(manifest_path.read_bytes(), signature_path.read_bytes(),
                           public_key, files, source=str(folder))


class VersionRegistry:
    """The versions under `root/versions/`, published and signed with `signing_key`.

    One aggregator process owns a registry: it sweeps unfinished publications at start.
    """

    def __init__(self, root: Path, signing_key: Ed25519PrivateKey) -> None:
        self.folder = Path(root) / "versions"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._signing_key = signing_key
        self.public_key = signing_key.public_key()
        # version -> (the files' stat stamp when they verified, manifest). Every download
        # request reads a version; re-hashing all of it each time made serving 100 watchers
        # hash-bound. A changed file changes its stamp, so tampering is still caught.
        self._verified: dict[int, tuple[tuple[tuple[str, int, int], ...], Manifest]] = {}
        for leftover in self.folder.glob(f"{_PARTIAL_PREFIX}*"):
            shutil.rmtree(leftover)  # a publication a crash cut short: never visible
        # The highest published number, kept here (set at start and at each publication)
        # so that watchers waking up need not list the folder.
        self._latest: int | None = max(self.numbers(), default=None)
        self.published = Waiters()  # Watch streams sleep on it until a publication

    def numbers(self) -> list[int]:
        return sorted(int(p.name) for p in self.folder.iterdir() if _FOLDER.fullmatch(p.name))

    def latest_number(self) -> int | None:
        """The highest published version number (None before genesis), from memory."""
        return self._latest

    def newest(self) -> int:
        """latest_number() where a version must exist (after genesis): IndexError before,
        as numbers()[-1] raises, without listing the folder."""
        if self._latest is None:
            raise IndexError("no version is published yet")
        return self._latest

    def get(self, version: int) -> Version:
        """Version `version`, verified (signature and every hash) as it is read."""
        folder = self.folder / f"{version:08d}"
        if not folder.is_dir():
            raise KeyError(f"version {version} is not published (have {self.numbers()[-5:]})")
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                      for p in sorted(folder.iterdir()))
        cached = self._verified.get(version)
        if cached is not None and cached[0] == stamp:
            return Version(folder, cached[1])
        manifest = verify(folder, self.public_key)
        if manifest.version != version:
            raise VersionError(f"{folder} holds version {manifest.version}, not {version}")
        self._verified[version] = (stamp, manifest)
        return Version(folder, manifest)

    def latest(self) -> Version | None:
        numbers = self.numbers()
        return self.get(numbers[-1]) if numbers else None

    def genesis(self, spec: AdapterSpec) -> Version:
        """Version 0: A from the seed, B = 0. Idempotent: an existing genesis made from the
        same spec is returned; one made from another spec is an error."""
        tensors = {}
        for module in spec.modules:
            key_a, key_b = lora_keys(module.name)
            tensors[key_a] = frozen_a(spec.frozen_a_seed, module.name, spec.rank,
                                      module.in_features)
            tensors[key_b] = np.zeros((module.out_features, spec.rank), dtype=np.float32)
        files = {ADAPTER_CONFIG: canonical_json(spec.adapter_config()),
                 ADAPTER_WEIGHTS: save_safetensors(tensors, metadata={"format": "pt"})}
        manifest = Manifest(0, None, spec.base_model_id, spec.base_model_sha256,
                            spec.frozen_a_seed, None, 0, 0.0, 0.0, "none", 0.0, 0.0,
                            _digests(files))
        if self.numbers():
            existing = self.get(0)
            if existing.manifest != manifest:
                raise VersionError(f"{existing.folder} is a different genesis (base model "
                                   f"{existing.manifest.base_model_id}, seed "
                                   f"{existing.manifest.frozen_a_seed}); use a fresh data dir")
            return existing
        return self._write(manifest, files)

    def publish(self, b: Mapping[str, np.ndarray], release: Release,
                notify: bool = True) -> Version:
        """Version latest+1: the parent's A and config with the new B. Refuses a B that does
        not match the parent's modules and shapes or is not finite, and a round that is not
        newer than the parent's. Publishing the parent's round again with the same B returns
        the parent (a retry after a crash between publishing and acknowledging).

        `notify` False: the version's watchers (`published`) are not woken here; the
        caller notifies them when it is ready (the coordinator, once the round that made
        the version is done). A watcher woken later still finds the version: it is
        `latest_number()` from the moment it is on disk."""
        parent = self.latest()
        if parent is None:
            raise VersionError("no genesis version: publish version 0 with genesis() first")
        a, parent_b = parent.tensors()
        if parent.manifest.round_id is not None and release.round_id <= parent.manifest.round_id:
            if release.round_id == parent.manifest.round_id and _same(b, parent_b):
                return parent
            raise VersionError(f"round {release.round_id} is not newer than version "
                               f"{parent.number}'s round {parent.manifest.round_id}")
        missing, unknown = sorted(set(parent_b) - set(b)), sorted(set(b) - set(parent_b))
        if missing or unknown:
            raise VersionError(f"B does not match the adapter: missing {missing[:3]}, "
                               f"unknown {unknown[:3]}")
        tensors = {}
        for module, old in parent_b.items():
            new = np.asarray(b[module])
            if new.shape != old.shape:
                raise VersionError(f"B of {module} has shape {new.shape}, the adapter's is "
                                   f"{old.shape}")
            if not np.all(np.isfinite(new)):
                raise VersionError(f"B of {module} holds NaN or infinity; refusing to publish")
            key_a, key_b = lora_keys(module)
            tensors[key_a] = a[module]
            tensors[key_b] = new.astype(np.float32)
        files = {ADAPTER_CONFIG: (parent.folder / ADAPTER_CONFIG).read_bytes(),
                 ADAPTER_WEIGHTS: save_safetensors(tensors, metadata={"format": "pt"})}
        base = parent.manifest
        manifest = Manifest(base.version + 1, base.version, base.base_model_id,
                            base.base_model_sha256, base.frozen_a_seed, release.round_id,
                            release.cohort_size, release.clip_norm, release.noise_multiplier,
                            release.noise_mode, release.epsilon, release.delta, _digests(files),
                            secure_aggregation=release.secure_aggregation)
        return self._write(manifest, files, notify)

    def _write(self, manifest: Manifest, files: Mapping[str, bytes],
               notify: bool = True) -> Version:
        target = self.folder / f"{manifest.version:08d}"
        raw = manifest.to_bytes()
        # write_folder's rename fails onto an existing version: two publishers of the same
        # version cannot both succeed.
        write_folder(target, {**files, MANIFEST: raw, SIGNATURE: self._signing_key.sign(raw)},
                     self.folder / f"{_PARTIAL_PREFIX}{manifest.version}-{secrets.token_hex(4)}")
        if self._latest is None or manifest.version > self._latest:
            self._latest = manifest.version
        if notify:
            self.published.notify()
        return Version(target, manifest)


def _digests(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def _same(b: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> bool:
    return set(b) == set(other) and all(
        np.array_equal(np.asarray(b[k], dtype=np.float32), other[k]) for k in other)
