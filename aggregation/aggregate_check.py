"""The aggregate check: is an unmasked cohort sum one that honest sites could have made?

Masked vectors cannot be checked (each is uniform noise alone), so the sum is, after
unmasking and before anything is derived from it (docs/hardening.md, "The aggregate
check"). The fleet's aggregator (server/coordinator.py) and the Flower ServerApp
(flower/secure.py) both call `AggregateBounds.check`; a sum that fails is never merged.

    1. the weight sum W of the n contributors lies in [n * min_site_weight, n * 1],
       widened by the weight code's rounding (n / its scale);
    2. every value of the weighted delta sum is finite;
    3. the mean delta's L2 norm is at most `AggregateBounds.mean_delta_bound`;
    4. after the merge, every value of the new B is finite (`check_merged`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fleetmind.aggregation.dp import DPConfig
from fleetmind.aggregation.quantize import FixedPoint

# The fleet's defaults (server/limits.py `ServerLimits` carries the same values as
# settings): the least staleness weight a site may use (0.01: tau up to 9,999 versions),
# k in the mean-delta bound, and the most privacy units a site may declare.
MIN_SITE_WEIGHT = 0.01
NOISE_NORM_MULTIPLE = 4.0
MAX_UNITS_PER_SITE = 10_000


class AggregateRejectedError(ValueError):
    """The unmasked aggregate is outside what the cohort's clip, weights and noise allow:
    signing it would publish a poisoned version. `check` names the check (records.CHECKS);
    `measured` and `allowed` are its number and range (None where it has none), as the
    ledger records them."""

    def __init__(self, message: str, check: str, measured: float | None = None,
                 allowed: tuple[float, float] | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.measured = measured if measured is not None and math.isfinite(measured) else None
        self.allowed = allowed


@dataclass(frozen=True)
class AggregateBounds:
    """What a round's honest cohort sum can hold.

    clip_norm: C per privacy unit (None: sites do not clip, and only the fixed-point clip
    bounds a delta). fixed_point_clip: c per coordinate. delta_code, weight_code: the
    round's payload codes (encoding.encoding_codes). noise: the round's DP config (None:
    no noise). min_site_weight: the least weight an honest site sends. noise_norm_multiple:
    k, how many times the noise's expected norm the bound allows."""

    clip_norm: float | None
    fixed_point_clip: float
    delta_code: FixedPoint
    weight_code: FixedPoint
    noise: DPConfig | None = None
    min_site_weight: float = MIN_SITE_WEIGHT
    noise_norm_multiple: float = NOISE_NORM_MULTIPLE

    def noise_stddev(self, contributors: int) -> float:
        """Standard deviation per coordinate of the noise in a sum of `contributors`
        vectors: z*C in the cohort sum (distributed, central), z*C from each site (local)."""
        if self.noise is None:
            return 0.0
        if self.noise.mode == "local":
            return self.noise.noise_stddev * math.sqrt(contributors)
        return self.noise.noise_stddev

    def mean_delta_bound(self, contributors: int, weight_sum: float, dimension: int,
                         units: int) -> float:
        """The largest L2 norm the mean delta sum_i w_i dB_i / sum_i w_i of honest sites can
        have (docs/hardening.md, "The aggregate check"):

            C * max_i min(u_i, c * sqrt(d) / C)  +  (k * sigma * sqrt(d) + n * sqrt(d) / s) / W

        `units` is max_i u_i. Each honest site's delta is a sum of u_i units clipped to C,
        so ||dB_i|| <= u_i*C, and its words are clipped to c (the fixed-point clip) per
        coordinate, so also <= c*sqrt(d); a weighted mean of vectors is no longer than the
        longest. The noise (sigma per coordinate over d coordinates) has norm about
        sigma*sqrt(d), far below k times that for k = 4 (Gaussian norm concentration); the
        fixed-point rounding adds below 1/s per site and coordinate. Both are divided by
        the weight sum W."""
        root_d = math.sqrt(dimension)
        words = self.fixed_point_clip * root_d
        signal = words if self.clip_norm is None else min(units * self.clip_norm, words)
        noise = self.noise_norm_multiple * self.noise_stddev(contributors) * root_d
        rounding = contributors * root_d / self.delta_code.scale
        return signal + (noise + rounding) / weight_sum

    def weight_range(self, contributors: int) -> tuple[float, float]:
        """[n * min_site_weight, n * 1], widened by the weight code's rounding (n / scale)."""
        slack = contributors / self.weight_code.scale
        return contributors * self.min_site_weight - slack, contributors * 1.0 + slack

    def check(self, weighted: np.ndarray, weight_sum: float, contributors: int,
              units: int = 1) -> None:
        """Refuses (AggregateRejectedError) an unmasked sum that honest sites could not have
        made: `weight_sum` outside `weight_range`, a non-finite value in `weighted` (the
        flat weighted delta sum), or a mean delta longer than `mean_delta_bound`. `units`:
        the most privacy units any contributor declared."""
        n = contributors
        low, high = self.weight_range(n)
        if not (math.isfinite(weight_sum) and weight_sum > 0 and low <= weight_sum <= high):
            raise AggregateRejectedError(
                f"the {n} sites' weights sum to {weight_sum:.6g}, outside "
                f"({max(low, 0):.6g}, {high:.6g}]: a weight word was forged",
                "weight_sum", weight_sum, (max(low, 0.0), high))
        if not np.isfinite(weighted).all():
            raise AggregateRejectedError("the aggregate holds non-finite values", "non_finite")
        norm = float(np.linalg.norm(weighted)) / weight_sum
        bound = self.mean_delta_bound(n, weight_sum, weighted.size, units)
        if not norm <= bound:
            raise AggregateRejectedError(f"the mean delta's norm is {norm:.6g}, above the "
                                         f"{bound:.6g} the cohort's clip and noise allow",
                                         "norm", norm, (0.0, bound))


def check_merged(b: Mapping[str, np.ndarray]) -> None:
    """Refuses a merged adapter with a non-finite value: the last check before signing."""
    if not all(np.isfinite(t).all() for t in b.values()):
        raise AggregateRejectedError("the merged adapter holds non-finite values",
                                     "merged_non_finite")
