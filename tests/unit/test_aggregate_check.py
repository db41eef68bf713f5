"""The aggregate check (aggregation/aggregate_check.py), the one the fleet's aggregator and
the Flower ServerApp run on an unmasked cohort sum: an honest sum passes; a forged weight
word, a non-finite value and an over-long mean delta are each refused, by name."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetmind.aggregation.aggregate_check import (
    AggregateBounds,
    AggregateRejectedError,
    check_merged,
)
from fleetmind.aggregation.dp import DPConfig
from fleetmind.aggregation.encoding import encoding_codes, site_payload
from fleetmind.aggregation.quantize import FixedPoint

CLIP, Z, SITES, DIM, FIXED_CLIP = 1.0, 1.0, 3, 64, 4.0
RING = 1 << 32


def codes() -> tuple[FixedPoint, FixedPoint]:
    return encoding_codes(CLIP, Z, "distributed", "session", SITES, FIXED_CLIP, SITES, 32)


def bounds(noise: DPConfig | None = None, clip_norm: float | None = CLIP,
           min_site_weight: float = 0.01) -> AggregateBounds:
    delta_code, weight_code = codes()
    return AggregateBounds(clip_norm, FIXED_CLIP, delta_code, weight_code, noise,
                           min_site_weight=min_site_weight)


def noise() -> DPConfig:
    return DPConfig(CLIP, Z, "session", "distributed", SITES)


def honest_rings(seed: int = 0, weights: tuple[float, ...] = (1.0,) * SITES
                 ) -> list[np.ndarray]:
    """Each site's ring words: a delta clipped to C, weighted, with its noise share."""
    rng = np.random.default_rng(seed)
    delta_code, weight_code = codes()
    rings = []
    for weight in weights:
        delta = rng.normal(size=DIM)
        delta *= CLIP / np.linalg.norm(delta)
        rings.append(site_payload(weight * delta, weight, delta_code, weight_code, noise(),
                                  rng).astype(np.int64))
    return rings


def opened(rings: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The unmasked sum, decoded: (sum_i w_i dB_i, sum_i w_i), as merge.open_secagg_sum."""
    delta_code, weight_code = codes()
    total = (sum(rings) % RING).astype(np.uint32)
    return delta_code.decode_sum(total[:-1]), float(weight_code.decode_sum(total[-1:])[0])


def refused(weighted: np.ndarray, weight_sum: float, check: AggregateBounds | None = None,
            units: int = 1) -> AggregateRejectedError:
    with pytest.raises(AggregateRejectedError) as caught:
        (check or bounds(noise())).check(weighted, weight_sum, SITES, units)
    return caught.value


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 0.02)])
def test_an_honest_noisy_sum_passes(weights: tuple[float, ...]) -> None:
    for seed in range(5):
        weighted, weight_sum = opened(honest_rings(seed, weights))
        assert weight_sum == pytest.approx(sum(weights), abs=1e-6)
        bounds(noise()).check(weighted, weight_sum, SITES)


def test_a_forged_weight_word_is_refused_as_weight_sum() -> None:
    rings = honest_rings()
    _, weight_code = codes()
    # The review's attack: a weight word cancelling the two honest weights, so S/W explodes.
    rings[2][-1] = round((-2.0 + 1e-6) * weight_code.scale) % RING
    weighted, weight_sum = opened(rings)
    error = refused(weighted, weight_sum)
    assert error.check == "weight_sum" and "a weight word was forged" in str(error)
    assert error.measured == pytest.approx(weight_sum)
    low, high = error.allowed or (None, None)
    assert low == pytest.approx(SITES * 0.01, abs=1e-6) and high == pytest.approx(SITES, 1e-6)
    # Above the cohort too; and on Flower, where every site weighs 1, a sum of 2.5 already is.
    assert refused(weighted, SITES + 0.5).check == "weight_sum"
    assert refused(weighted, SITES - 0.5, bounds(noise(), min_site_weight=1.0)).check \
        == "weight_sum"
    bounds(noise()).check(weighted * 0, SITES - 0.5, SITES)  # the fleet's 0.01 allows it


def test_a_non_finite_value_is_refused_as_non_finite() -> None:
    weighted, weight_sum = opened(honest_rings())
    for bad in (math.nan, math.inf):
        poisoned = weighted.copy()
        poisoned[7] = bad
        error = refused(poisoned, weight_sum)
        assert (error.check, error.measured, error.allowed) == ("non_finite", None, None)


def test_an_over_long_mean_delta_is_refused_as_norm() -> None:
    rings = honest_rings()
    # A site whose words are 100 times what its clip allows: masks hide it until the sum.
    words = np.where(rings[2][:-1] >= RING // 2, rings[2][:-1] - RING, rings[2][:-1])
    rings[2][:-1] = (words * 100) % RING
    weighted, weight_sum = opened(rings)
    error = refused(weighted, weight_sum)
    assert error.check == "norm" and "the cohort's clip and noise allow" in str(error)
    bound = bounds(noise()).mean_delta_bound(SITES, weight_sum, DIM, 1)
    assert error.measured == pytest.approx(np.linalg.norm(weighted) / weight_sum)
    assert error.measured > bound and error.allowed == (0.0, bound)


def test_the_bound_is_the_documented_formula() -> None:
    delta_code, _ = codes()
    check = bounds(noise())
    n, w, d, k = SITES, 2.5, DIM, check.noise_norm_multiple
    sigma = Z * CLIP  # distributed: z*C on the sum
    for units in (1, 3, 10_000):
        expected = CLIP * min(units, FIXED_CLIP * math.sqrt(d) / CLIP) + (
            k * sigma * math.sqrt(d) + n * math.sqrt(d) / delta_code.scale) / w
        assert check.mean_delta_bound(n, w, d, units) == pytest.approx(expected, rel=1e-12)
    # Local noise: every site adds z*C, so the sum carries sqrt(n) times that.
    local = bounds(DPConfig(CLIP, Z, "session", "local", SITES))
    assert local.noise_stddev(n) == pytest.approx(sigma * math.sqrt(n))
    # Without clipping only the fixed-point clip bounds a site: c*sqrt(d).
    assert bounds(clip_norm=None).mean_delta_bound(n, n, d, 1) == pytest.approx(
        FIXED_CLIP * math.sqrt(d) + math.sqrt(d) / delta_code.scale)


def test_declared_units_widen_the_bound_without_noise() -> None:
    # Three sites each summing 3 units clipped to C: a mean of norm 2.5 is honest for
    # u = 3 and impossible for u = 1.
    weighted = np.full(DIM, 2.5 / math.sqrt(DIM)) * SITES
    error = refused(weighted, float(SITES), bounds(None), units=1)
    assert error.check == "norm"
    bounds(None).check(weighted, float(SITES), SITES, units=3)


def test_a_merged_adapter_with_a_non_finite_value_is_refused() -> None:
    check_merged({"a": np.zeros((2, 3)), "b": np.ones(4)})  # finite: passes
    with pytest.raises(AggregateRejectedError) as refused:
        check_merged({"a": np.zeros((2, 3)), "b": np.array([1.0, np.inf])})
    assert refused.value.check == "merged_non_finite"
