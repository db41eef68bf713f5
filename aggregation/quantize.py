"""Fixed-point coding of float vectors into the ring Z_2^b, for secure summation.

A site maps each value x (clipped to [-clip, clip]) to the integer q = floor(x*s + u),
u ~ U[0, 1): stochastic rounding, so E[q] = x*s and the sum is unbiased. Values live in
two's complement mod 2^b. The scale s leaves headroom for `cohort_max` sites, each adding
at most `noise_bound` of integer DP noise (in value units):

    s = ((2^(b-1) - 1) / cohort_max - 1) / (clip + noise_bound)

so each site's word has |q| <= (2^(b-1) - 1) / cohort_max and the sum of cohort_max of
them cannot wrap past 2^(b-1): the ring sum decodes to the true integer sum.

Error bound (tested): each site's rounding error is below 1/s per coordinate, so the
decoded sum of n sites is within n/s of the sum of the clipped values, per coordinate,
always; the error is zero-mean with standard deviation at most sqrt(n)/(2s).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

RING_BITS = (16, 24, 32)  # byte-aligned rings, so a masked vector packs with no waste


def default_rng() -> np.random.Generator:
    """A generator seeded with 128 bits from the OS, for rounding and DP noise."""
    return np.random.default_rng(secrets.randbits(128))


@dataclass(frozen=True)
class FixedPoint:
    """The code both ends agree on: clip range, cohort headroom, noise headroom, ring."""

    clip: float
    cohort_max: int
    ring_bits: int = 32
    noise_bound: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip={self.clip} must be finite and > 0")
        if self.cohort_max < 1:
            raise ValueError(f"cohort_max={self.cohort_max} must be >= 1")
        if self.ring_bits not in RING_BITS:
            raise ValueError(f"ring_bits={self.ring_bits} must be one of {RING_BITS}")
        if not (np.isfinite(self.noise_bound) and self.noise_bound >= 0):
            raise ValueError(f"noise_bound={self.noise_bound} must be finite and >= 0")
        if self.site_word_limit < 2:
            raise ValueError(f"a {self.ring_bits}-bit ring has no room for {self.cohort_max} "
                             "sites: use a wider ring or a smaller cohort")

    @property
    def site_word_limit(self) -> int:
        """Largest |word| one site may contribute."""
        return int((2 ** (self.ring_bits - 1) - 1) // self.cohort_max)

    @property
    def scale(self) -> float:
        return (self.site_word_limit - 1) / (self.clip + self.noise_bound)

    def sum_error_bound(self, count: int) -> float:
        """Worst-case rounding error per coordinate of a decoded sum of `count` sites."""
        return count / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None,
               integer_noise: np.ndarray | None = None) -> np.ndarray:
        """Ring words (uint32, < 2^ring_bits) for `values`, clipped to [-clip, clip].

        `integer_noise` (already in ring units) is added after rounding: distributed DP
        noise; it must stay within noise_bound * scale.
        """
        rng = rng or default_rng()
        scaled = np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip)
        scaled *= self.scale
        words = np.floor(scaled + rng.random(scaled.shape)).astype(np.int64)
        if integer_noise is not None:
            limit = self.noise_bound * self.scale
            if np.abs(integer_noise).max(initial=0) > limit:
                raise ValueError(f"integer noise exceeds the headroom of {limit:.0f} words: "
                                 "raise noise_bound")
            words += integer_noise.astype(np.int64)
        return (words & ((1 << self.ring_bits) - 1)).astype(np.uint32)

    def decode_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        """Float64 values of a ring sum of at most cohort_max encoded vectors."""
        words = ring_sum.astype(np.int64)
        half = 1 << (self.ring_bits - 1)
        words[words >= half] -= 1 << self.ring_bits
        return words / self.scale
