import numpy as np
import pytest

from fleetmind.aggregation.quantize import FixedPoint


@pytest.mark.parametrize("ring_bits, cohort", [(32, 3), (32, 100), (24, 256), (16, 8)])
def test_sum_within_documented_bound(ring_bits, cohort) -> None:
    code = FixedPoint(clip=0.5, cohort_max=cohort, ring_bits=ring_bits)
    rng = np.random.default_rng(cohort)
    values = rng.uniform(-0.5, 0.5, size=(cohort, 2000))
    ring_sum = np.zeros(2000, np.uint32)
    for row in values:
        ring_sum += code.encode(row, rng)
    ring_sum &= np.uint32((1 << ring_bits) - 1)
    error = np.abs(code.decode_sum(ring_sum) - values.sum(axis=0))
    assert error.max() <= code.sum_error_bound(cohort)
    # stochastic rounding: zero-mean, standard deviation at most sqrt(n) / (2 s)
    assert error.std() <= np.sqrt(cohort) / (2 * code.scale) * 1.1


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extremes_at_full_cohort_do_not_overflow(sign) -> None:
    code = FixedPoint(clip=1.0, cohort_max=1000, ring_bits=32)
    rng = np.random.default_rng(0)
    ring_sum = np.zeros(10, np.uint32)
    for _ in range(1000):
        ring_sum += code.encode(np.full(10, 5.0 * sign), rng)  # clipped to +-1
    np.testing.assert_allclose(code.decode_sum(ring_sum), 1000 * sign,
                               atol=code.sum_error_bound(1000))


def test_unbiased() -> None:
    code = FixedPoint(clip=1.0, cohort_max=2**20, ring_bits=32)  # coarse: 2^11 levels
    rng = np.random.default_rng(0)
    value = 0.3 / code.scale  # a third of one level
    decoded = code.decode_sum(code.encode(np.full(200_000, value), rng))
    assert decoded.mean() == pytest.approx(value, rel=0.02)


def test_integer_noise_headroom() -> None:
    code = FixedPoint(clip=1.0, cohort_max=4, noise_bound=0.5)
    noise = np.full(3, int(0.5 * code.scale) + 10)
    with pytest.raises(ValueError, match="noise_bound"):
        code.encode(np.zeros(3), integer_noise=noise)


@pytest.mark.parametrize("kwargs", [{"clip": 0.0, "cohort_max": 2}, {"clip": 1, "cohort_max": 0},
                                    {"clip": 1, "cohort_max": 2, "ring_bits": 20},
                                    {"clip": 1, "cohort_max": 2**16, "ring_bits": 16}])
def test_bad_codes_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        FixedPoint(**kwargs)
