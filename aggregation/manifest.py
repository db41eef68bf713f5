"""The signed version artifact's format: `manifest.json` and its Ed25519 check.

A published version is an adapter folder plus `manifest.json` (what the version is, how it
was made, and the sha256 of every other file) and `manifest.sig` (Ed25519 by the aggregator
key over the manifest's exact bytes). The aggregator writes it (fleetmind.server.versions)
and every site checks it before activation (fleetmind.client.versions); both use this
module so the two sides cannot disagree on a byte. Pure: bytes in, a Manifest or a
VersionError out, no file I/O (tests/integration/test_boundaries.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMAT = "fleetmind.version/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NoiseMode = Literal["none", "distributed", "central", "local"]
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class VersionError(ValueError):
    """A version is unsigned, tampered with, incomplete or malformed: do not activate it.
    The message names the file or field."""


def canonical_json(value: Any) -> bytes:
    """The one byte string a manifest signs as: sorted keys, no spaces, ASCII, no NaN or
    infinity. Byte-for-byte the same as fleetmind.runtime.signed_log.canonical_json (a test
    checks), repeated here because aggregation/ may not import the server."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def base_model_digest(file_digests: Mapping[str, str]) -> str:
    """The base model's sha256 from its weight files' sha256s (file name -> hex): the
    sha256 of the lines `sha256sum` prints for them, sorted by name ("<hex>  <name>\n"), so
    an operator can check it by hand with `sha256sum *.safetensors | sha256sum`. The sites
    compute it from their model folder (fleetmind.client.model.base_model_hash) and refuse
    a version whose manifest names another."""
    if not file_digests:
        raise ValueError("a base model has at least one weight file")
    for name, digest in file_digests.items():
        if not SHA256_HEX.fullmatch(digest) or "\n" in name:
            raise ValueError(f"weight file {name!r}: sha256 {digest!r} is not 64 lowercase hex")
    listing = "".join(f"{file_digests[name]}  {name}\n" for name in sorted(file_digests))
    return hashlib.sha256(listing.encode()).hexdigest()


# The fleet's adapter unless an operator says otherwise: rank 32, alpha 2 x rank. On the toy
# model rank 8 stores 7 of 32 facts and rank 32 stores 22 (docs/learning-scale.md, "Builder 2").
DEFAULT_RANK = 32
DEFAULT_ALPHA = 2.0 * DEFAULT_RANK


def peft_adapter_config(base_model_id: str, rank: int, alpha: float,
                        target_modules: Sequence[str], fan_in_fan_out: bool = False
                        ) -> dict[str, Any]:
    """PEFT's adapter_config.json for a version, with the fields vLLM's LoRA loader reads
    (r, lora_alpha, target_modules, bias "none", no modules_to_save, no DoRA). Target
    modules are full module paths: PEFT matches a full name exactly, so the adapter lands on
    these layers and no others. `fan_in_fan_out`: the layers are Conv1D (GPT-2), whose
    weight is stored (in, out); it travels in the aggregator's adapter spec, which knows no
    torch."""
    if not isinstance(fan_in_fan_out, bool):
        raise ValueError(f"fan_in_fan_out={fan_in_fan_out!r} must be true or false")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_id,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(target_modules),
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }


def check_release(round_id: int | None, cohort_size: int, clip_norm: float,
                  noise_multiplier: float, noise_mode: str, epsilon: float, delta: float,
                  genesis: bool, secure_aggregation: bool = True) -> None:
    """Raises ValueError unless these describe a publishable round (or genesis)."""
    if not isinstance(secure_aggregation, bool):
        raise ValueError(f"secure_aggregation={secure_aggregation!r} must be true or false")
    if genesis:
        # Genesis learned nothing from anyone: it spends no privacy and sums no sites.
        if (cohort_size, clip_norm, noise_multiplier, noise_mode, epsilon, delta,
                secure_aggregation) != (0, 0.0, 0.0, "none", 0.0, 0.0, True):
            raise ValueError("genesis (version 0) must have cohort_size 0, no clip, no noise, "
                             "epsilon 0 and no secure_aggregation flag")
        return
    if round_id is None or round_id < 0:
        raise ValueError(f"round_id={round_id} must be >= 0")
    if cohort_size < 2:
        raise ValueError(f"cohort_size={cohort_size}: a published sum needs >= 2 sites")
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier),
                        ("epsilon", epsilon)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value} must be finite and >= 0")
    if clip_norm <= 0:
        raise ValueError(f"clip_norm={clip_norm} must be > 0")
    if noise_mode not in ("none", "distributed", "central", "local"):
        raise ValueError(f"noise_mode={noise_mode!r} must be none, distributed, central or "
                         "local")
    if not 0 <= delta < 1:
        raise ValueError(f"delta={delta} must be in [0, 1)")


@dataclass(frozen=True)
class Manifest:
    """manifest.json. Genesis (version 0) has no parent and no round, and spends nothing."""

    version: int
    parent: int | None
    base_model_id: str
    base_model_sha256: str
    frozen_a_seed: int
    round_id: int | None
    cohort_size: int
    clip_norm: float
    noise_multiplier: float
    noise_mode: NoiseMode
    epsilon: float
    delta: float
    files: Mapping[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    format: str = FORMAT
    # False: the round's sum was taken without secure aggregation (the aggregator saw each
    # site's vector; an ablation, loopback only). Written only when false, so manifests
    # from before the flag keep their bytes and signatures.
    secure_aggregation: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        for name in ("clip_norm", "noise_multiplier", "epsilon", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"manifest {name}={value!r} must be a number")
            object.__setattr__(self, name, float(value))
        for name in ("version", "parent", "frozen_a_seed", "round_id", "cohort_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                    value is None and name in ("parent", "round_id")):
                raise ValueError(f"manifest {name}={value!r} must be an integer")
        if self.format != FORMAT:
            raise ValueError(f"manifest format {self.format!r} is not {FORMAT!r}: a newer "
                             "aggregator wrote it; upgrade this site")
        if self.version < 0:
            raise ValueError(f"version={self.version} must be >= 0")
        genesis = self.version == 0
        if genesis != (self.parent is None) or genesis != (self.round_id is None):
            raise ValueError(f"version {self.version}: only genesis (version 0) has no parent "
                             f"and no round (parent={self.parent}, round_id={self.round_id})")
        if self.parent is not None and not 0 <= self.parent < self.version:
            raise ValueError(f"parent={self.parent} must be an earlier version than "
                             f"{self.version}")
        if not SHA256_HEX.fullmatch(self.base_model_sha256):
            raise ValueError(f"base_model_sha256={self.base_model_sha256!r} is not a sha256")
        check_release(self.round_id, self.cohort_size, self.clip_norm, self.noise_multiplier,
                      self.noise_mode, self.epsilon, self.delta, genesis,
                      self.secure_aggregation)
        if set(self.files) != {ADAPTER_CONFIG, ADAPTER_WEIGHTS}:
            raise ValueError(f"manifest lists {sorted(self.files)}; a version holds exactly "
                             f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        for name, digest in self.files.items():
            if not SHA256_HEX.fullmatch(digest):
                raise ValueError(f"sha256 of {name} is {digest!r}, not 64 lowercase hex digits")

    def to_bytes(self) -> bytes:
        """The canonical bytes: what manifest.json holds and manifest.sig signs."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["files"] = dict(self.files)
        if self.secure_aggregation:
            del values["secure_aggregation"]
        return canonical_json(values)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            manifest = cls(**json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as error:
            raise VersionError(f"{MANIFEST} is malformed: {error}") from None
        if manifest.to_bytes() != raw:
            raise VersionError(f"{MANIFEST} is not in canonical form, so its signature cannot "
                               "be checked against what it says")
        return manifest


def public_key(key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes (or the key itself)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(key))
    except ValueError:
        raise VersionError(f"the aggregator key has {len(key)} bytes, not an Ed25519 public "
                           "key's 32: take it from the enrolment reply") from None


def verify_manifest(manifest_bytes: bytes, signature: bytes,
                    public_key_bytes: Ed25519PublicKey | bytes, files: Mapping[str, bytes],
                    *, source: str = "version") -> Manifest:
    """Checks a version before anyone activates it: the Ed25519 signature over
    `manifest_bytes`, the manifest itself, that `files` (name -> content) holds exactly the
    files the manifest lists, and each one's sha256. `source` names the version in errors
    (a folder, a download). Raises VersionError naming what failed; returns the manifest."""
    if not manifest_bytes or not signature:
        raise VersionError(f"{source} is unsigned: {MANIFEST} and {SIGNATURE} must both be "
                           "present; do not activate it")
    try:
        public_key(public_key_bytes).verify(signature, manifest_bytes)
    except InvalidSignature:
        raise VersionError(f"{source}: {SIGNATURE} does not verify with the aggregator key; "
                           "the manifest was altered or signed by someone else") from None
    manifest = Manifest.from_bytes(manifest_bytes)
    extra = sorted(set(files) - set(manifest.files))
    if extra:
        raise VersionError(f"{source}: files not in the manifest: {extra}; a version holds "
                           "only what its signed manifest lists")
    for name, digest in sorted(manifest.files.items()):
        if name not in files:
            raise VersionError(f"{source}: {name} is missing (listed in the manifest)")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise VersionError(f"{source}: {name} does not match its sha256 in the manifest; "
                               "it was altered or truncated")
    return manifest
