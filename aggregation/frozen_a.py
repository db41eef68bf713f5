"""LoRA's frozen A factor, derived from a public seed (FFA-LoRA, arXiv 2403.12313).

Every site and the aggregator compute the same A for a module from the seed recorded in
the version manifest, so only B trains and `B_new = B + eta * mean(dB)` is an exact merge.
numpy's PCG64 seeded from SHA-256 makes it identical on every machine, with or without torch.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def frozen_a(seed: int, module: str, rank: int, in_features: int) -> np.ndarray:
    """A for `module`: (rank, in_features) float32, uniform in ±1/sqrt(in_features), the bound
    of the Kaiming-uniform init PEFT gives A."""
    if rank < 1 or in_features < 1:
        raise ValueError(f"frozen A for {module}: rank={rank} and in_features={in_features} "
                         "must be positive")
    key = hashlib.sha256(f"fleetmind-frozen-a/{seed}/{module}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(key[:16], "big")))
    bound = 1.0 / math.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)
