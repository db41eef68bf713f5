"""Differential privacy: clip each privacy unit's contribution to L2 norm C, add Gaussian
noise calibrated to C.

The unit is the end user's session by default (docs/design.md, "Differential privacy"):
a site sums the clipped deltas of its sessions, so one session moves the sum by at most C
while a fact many sessions repeat adds up above the noise. The unit may also be an end
user (all of a user's sessions summed, then clipped) or the whole site.

Noise modes, for a cohort sum with standard deviation sigma = z*C in total:
- distributed (default, untrusted aggregator): each of n sites adds discrete Gaussian
  noise of standard deviation sigma/sqrt(n) in the integer ring before masking; the
  aggregator sees only the sum, which carries the full noise (Kairouz et al. 2021, "The
  Distributed Discrete Gaussian Mechanism"; for sigma in ring units well above 1 the sum of
  discrete Gaussians is within a negligible distance of one, and the accountant treats it
  as the continuous Gaussian). Sites that drop out take their share of the noise with
  them: `effective_noise_multiplier` gives what the sum actually carried;
- central (trusted aggregator): the aggregator adds N(0, sigma^2) to the unmasked sum;
- local: each site adds the full sigma itself (robust to dropouts and collusion, n times
  the variance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fleetmind.aggregation.quantize import FixedPoint, default_rng

PrivacyUnit = Literal["session", "user", "site"]
# Finest first: each unit is a union of the ones before it.
PRIVACY_UNITS: tuple[PrivacyUnit, ...] = ("session", "user", "site")
NoiseMode = Literal["distributed", "central", "local"]
# Discrete Gaussian draws are kept within this many standard deviations so the ring has
# headroom for them; a draw beyond has probability below 1e-32 and is drawn again.
NOISE_TAIL_SIGMAS = 12.0


@dataclass(frozen=True)
class DPConfig:
    """clip_norm: C, the L2 bound of one unit's contribution. noise_multiplier: z, the
    cohort sum's noise standard deviation over C. expected_cohort: sites the distributed
    noise is split across."""

    clip_norm: float
    noise_multiplier: float
    unit: PrivacyUnit = "session"
    mode: NoiseMode = "distributed"
    expected_cohort: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm={self.clip_norm} must be finite and > 0")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be >= 0")
        check_privacy_unit(self.unit, "unit")
        if self.mode not in ("distributed", "central", "local"):
            raise ValueError(f"mode={self.mode!r} must be distributed, central or local")
        if self.expected_cohort < 1:
            raise ValueError(f"expected_cohort={self.expected_cohort} must be >= 1")

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the noise on the cohort sum (per coordinate)."""
        return self.noise_multiplier * self.clip_norm

    @property
    def site_noise_stddev(self) -> float:
        """What each site adds: its share (distributed), all of it (local), none (central)."""
        if self.mode == "distributed":
            return self.noise_stddev / math.sqrt(self.expected_cohort)
        return self.noise_stddev if self.mode == "local" else 0.0

    def effective_noise_multiplier(self, contributors: int) -> float:
        """z the cohort sum really carried when `contributors` sites added noise."""
        if self.mode == "distributed":
            return self.noise_multiplier * math.sqrt(min(contributors, self.expected_cohort)
                                                     / self.expected_cohort)
        if self.mode == "local":
            return self.noise_multiplier * math.sqrt(contributors)
        return self.noise_multiplier

    def fixed_point(self, clip: float, ring_bits: int = 32) -> FixedPoint:
        """A ring code with headroom for this config's per-site integer noise. `clip` bounds
        each coordinate of a site's whole clipped sum: up to (units at the site) x C."""
        return FixedPoint(clip, self.expected_cohort, ring_bits,
                          noise_bound=NOISE_TAIL_SIGMAS * self.site_noise_stddev)


def clip_to_norm(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """(vector scaled down to L2 norm <= clip_norm, its norm before): for the outbox. The
    norm and the scaling are in float64: a float32 norm of 131,072 coordinates came out
    1e-5 low, and the clipped vector that much over the bound the accountant charges for."""
    wide = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(wide))
    if not math.isfinite(norm):
        raise ValueError("vector has non-finite values")
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return (wide * factor).astype(np.float32), norm


@dataclass(frozen=True)
class Contribution:
    """One session's flattened delta, with the ids that decide its privacy unit."""

    session: str
    user: str
    delta: np.ndarray


def check_privacy_unit(unit: object, name: str = "privacy_unit") -> None:
    """Raises ValueError unless `unit` is one of PRIVACY_UNITS."""
    if unit not in PRIVACY_UNITS:
        raise ValueError(f"{name}={unit!r} must be one of {', '.join(PRIVACY_UNITS)}")


def bounds(clipped_unit: str, clipped_norm: float, promised_unit: str,
           promised_norm: float) -> bool:
    """Whether clipping each `clipped_unit` to `clipped_norm` keeps the promise the
    accountant charges for: adding or removing one `promised_unit` moves the sum by at most
    `promised_norm`. The same unit keeps it at the same norm. A coarser one keeps it at
    half: removing one session from a user clipped as a whole moves clip(user) to
    clip(user without it), up to twice the clip apart. A finer one never does: a user
    with k sessions each clipped to C moves the sum by k*C. Unknown units keep nothing."""
    if clipped_unit not in PRIVACY_UNITS or promised_unit not in PRIVACY_UNITS:
        return False
    finer, coarser = PRIVACY_UNITS.index(promised_unit), PRIVACY_UNITS.index(clipped_unit)
    if coarser < finer:
        return False
    bound = promised_norm if coarser == finer else promised_norm / 2
    return clipped_norm <= bound * (1 + 1e-9)


def unit_key(contribution: Contribution, unit: PrivacyUnit) -> str:
    return {"session": contribution.session, "user": contribution.user, "site": ""}[unit]


def clip_and_sum(contributions: Sequence[Contribution], clip_norm: float,
                 unit: PrivacyUnit = "session") -> tuple[np.ndarray, dict[str, float]]:
    """Sum the deltas of each unit (every re-use of a session lands in that session's
    unit, so it is clipped once together), clip each unit's total to C, sum the units.
    Returns the sum and each unit's norm before clipping."""
    if not contributions:
        raise ValueError("no contributions to sum")
    per_unit: dict[str, np.ndarray] = {}
    for contribution in contributions:
        key = unit_key(contribution, unit)
        delta = np.asarray(contribution.delta, dtype=np.float64)
        per_unit[key] = per_unit[key] + delta if key in per_unit else delta.copy()
    total = np.zeros_like(next(iter(per_unit.values())))
    norms = {}
    for key, delta in per_unit.items():
        clipped, norms[key] = clip_to_norm(delta, clip_norm)
        total += clipped
    return total.astype(np.float32), norms


def sample_discrete_gaussian(stddev: float, size: int,
                             rng: np.random.Generator | None = None) -> np.ndarray:
    """Integers with P(x) proportional to exp(-x^2 / (2 stddev^2)), truncated at
    NOISE_TAIL_SIGMAS. Canonne, Kamath and Steinke 2020, Algorithm 3: a discrete Laplace
    proposal with scale t = floor(stddev) + 1, accepted with probability
    exp(-(|y| - stddev^2/t)^2 / (2 stddev^2)). (Float acceptance tests: exact up to
    float64 rounding, which is far below the noise.)"""
    rng = rng or default_rng()
    if stddev == 0:
        return np.zeros(size, dtype=np.int64)
    if not stddev > 0:
        raise ValueError(f"stddev={stddev} must be >= 0")
    t = math.floor(stddev) + 1
    success = -math.expm1(-1.0 / t)  # discrete Laplace(t) = difference of two geometrics
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        want = int((size - filled) * 1.5) + 16
        y = rng.geometric(success, want) - rng.geometric(success, want)
        accept = rng.random(want) < np.exp(-((np.abs(y) - stddev**2 / t) ** 2)
                                           / (2 * stddev**2))
        accept &= np.abs(y) <= NOISE_TAIL_SIGMAS * stddev
        taken = y[accept][: size - filled]
        out[filled:filled + taken.size] = taken
        filled += taken.size
    return out


def distributed_noise(config: DPConfig, code: FixedPoint, size: int,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """This site's share of the noise, in ring units of `code`, to pass to its encode."""
    if config.mode != "distributed":
        raise ValueError(f"distributed noise requested in {config.mode!r} mode")
    return sample_discrete_gaussian(config.site_noise_stddev * code.scale, size, rng)


def add_gaussian_noise(vector: np.ndarray, stddev: float,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """vector + N(0, stddev^2): central mode at the aggregator, local mode at a site."""
    rng = rng or default_rng()
    return (vector + rng.normal(0.0, stddev, vector.shape)).astype(np.float32)


def noise_for_site(vector: np.ndarray, config: DPConfig,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Local mode: the site's vector with the full noise added; other modes: unchanged
    (distributed noise is added in the ring, see `distributed_noise`)."""
    if config.mode == "local":
        return add_gaussian_noise(vector, config.noise_stddev, rng)
    return vector


def noise_for_aggregator(cohort_sum: np.ndarray, config: DPConfig,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Central mode: the unmasked sum with the full noise; other modes: unchanged."""
    if config.mode == "central":
        return add_gaussian_noise(cohort_sum, config.noise_stddev, rng)
    return cohort_sum
