"""The update a site sends: the delta of LoRA's B per module, and what it was made from.

Serialised as safetensors (the format PEFT and every tool around it reads) with the
metadata as JSON in the safetensors header, so one blob carries both.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

METADATA_KEY = "fleetmind.update"
DEFAULT_MAX_BYTES = 256 * 2**20  # far above any LoRA-B delta; stops a hostile upload early


class UpdateError(ValueError):
    """An update is malformed or does not fit the global version; the message names it."""


@dataclass(frozen=True)
class UpdateMetadata:
    """site: who sent it. base_version: the global version the delta was trained from.
    weight: the site's aggregation weight (already including the staleness weight).
    staleness: versions published since base_version when the site uploaded.
    sessions, tokens: how much local data went in. seed: the public frozen-A seed."""

    site: str
    base_version: int
    weight: float = 1.0
    staleness: int = 0
    sessions: int = 0
    tokens: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.site:
            raise UpdateError("metadata.site must be a non-empty string")
        for name in ("base_version", "staleness", "sessions", "tokens", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UpdateError(f"metadata.{name}={value!r} must be an integer >= 0")
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight)
                and self.weight > 0):
            raise UpdateError(f"metadata.weight={self.weight!r} must be finite and > 0")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> UpdateMetadata:
        expected = set(cls.__dataclass_fields__)
        if set(fields) != expected:
            raise UpdateError(f"metadata fields {sorted(fields)} != {sorted(expected)}")
        return cls(**fields)


@dataclass(frozen=True)
class Update:
    """Named float32 tensors (module name -> delta of B), all finite, read-only."""

    tensors: Mapping[str, np.ndarray]
    metadata: UpdateMetadata

    def __post_init__(self) -> None:
        if not self.tensors:
            raise UpdateError("an update needs at least one tensor")
        frozen = {}
        for name, tensor in self.tensors.items():
            if not isinstance(name, str) or not name:
                raise UpdateError(f"tensor name {name!r} must be a non-empty string")
            if not isinstance(tensor, np.ndarray) or tensor.dtype != np.float32:
                raise UpdateError(f"tensor {name!r} must be a float32 numpy array, got "
                                  f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
            if not np.isfinite(tensor).all():
                bad = int((~np.isfinite(tensor)).sum())
                raise UpdateError(f"tensor {name!r} has {bad} non-finite values")
            tensor = tensor.copy()
            tensor.flags.writeable = False
            frozen[name] = tensor
        object.__setattr__(self, "tensors", MappingProxyType(frozen))

    @property
    def parameter_count(self) -> int:
        return sum(tensor.size for tensor in self.tensors.values())

    def validate_against(self, expected_shapes: Mapping[str, tuple[int, ...]],
                         max_parameters: int | None = None) -> None:
        """Raise UpdateError unless names and shapes are exactly the global version's."""
        missing = sorted(set(expected_shapes) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected_shapes))
        if missing or extra:
            raise UpdateError(f"update from {self.metadata.site!r}: missing tensors {missing},"
                              f" unexpected tensors {extra}")
        for name, shape in expected_shapes.items():
            if self.tensors[name].shape != tuple(shape):
                raise UpdateError(f"tensor {name!r} has shape {self.tensors[name].shape}, the "
                                  f"global version has {tuple(shape)}")
        if max_parameters is not None and self.parameter_count > max_parameters:
            raise UpdateError(f"update has {self.parameter_count} parameters, limit "
                              f"{max_parameters}")

    def to_bytes(self) -> bytes:
        metadata = {METADATA_KEY: json.dumps(asdict(self.metadata), sort_keys=True)}
        return safetensors.numpy.save(dict(self.tensors), metadata=metadata)

    @classmethod
    def from_bytes(cls, blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Update:
        if len(blob) > max_bytes:
            raise UpdateError(f"update is {len(blob)} bytes, limit {max_bytes}")
        try:
            tensors = safetensors.numpy.load(blob)
            (header_length,) = struct.unpack("<Q", blob[:8])
            header = json.loads(blob[8:8 + header_length])
            fields = json.loads(header["__metadata__"][METADATA_KEY])
        except (SafetensorError, struct.error, ValueError, KeyError, TypeError) as error:
            raise UpdateError(f"not a fleetmind update (safetensors with {METADATA_KEY!r} "
                              f"metadata): {error}") from None
        if not isinstance(fields, dict):
            raise UpdateError(f"{METADATA_KEY!r} metadata must be a JSON object")
        return cls(tensors, UpdateMetadata.from_dict(fields))
