import math

import numpy as np
import pytest

from fleetmind.aggregation.dp import (
    Contribution,
    DPConfig,
    bounds,
    clip_and_sum,
    clip_to_norm,
    distributed_noise,
    noise_for_aggregator,
    noise_for_site,
    sample_discrete_gaussian,
)


def test_clip_to_norm() -> None:
    clipped, norm = clip_to_norm(np.array([3.0, 4.0]), 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
    small, _ = clip_to_norm(np.array([0.3, 0.4]), 1.0)
    np.testing.assert_allclose(small, [0.3, 0.4], rtol=1e-6)


@pytest.mark.parametrize(("size", "value"), [(131_072, 0.1), (65_536, 0.4667),
                                            (32_768, 0.4667), (16_384, 1 / 3)])
def test_a_large_float32_delta_is_clipped_to_the_bound_not_past_it(size: int, value: float
                                                                    ) -> None:
    """An adapter's B has 10^4-10^7 coordinates: its float32 norm can come out 1e-5 low,
    which put these clipped vectors up to 1.06e-5 over C. Measured in float64 they are
    within float32 rounding of it."""
    clipped, norm = clip_to_norm(np.full(size, value, np.float32), 0.5)
    assert clipped.dtype == np.float32
    assert norm == pytest.approx(float(np.float32(value)) * size ** 0.5, rel=1e-9)
    assert np.linalg.norm(clipped.astype(np.float64)) <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("unit, expected_units", [("session", 3), ("user", 2), ("site", 1)])
def test_units_are_clipped_once_each(unit, expected_units) -> None:
    contributions = [Contribution("s1", "alice", np.array([10.0, 0.0])),
                     Contribution("s2", "alice", np.array([0.0, 10.0])),
                     Contribution("s3", "bob", np.array([10.0, 0.0])),
                     # a replay of s1's dreams lands in s1's unit: clipped with it
                     Contribution("s1", "alice", np.array([10.0, 0.0]))]
    total, norms = clip_and_sum(contributions, clip_norm=1.0, unit=unit)
    assert len(norms) == expected_units
    assert np.linalg.norm(total) <= expected_units * 1.0 + 1e-6


@pytest.mark.parametrize("clipped, promised, kept", [
    (("session", 1.0), ("session", 1.0), True), (("user", 0.5), ("user", 1.0), True),
    (("site", 0.5), ("session", 1.0), True), (("user", 0.5), ("session", 1.0), True),
    (("site", 1.0), ("session", 1.0), False), (("user", 0.6), ("session", 1.0), False),
    (("session", 1.0), ("user", 1.0), False), (("user", 1.0), ("site", 1.0), False),
    (("session", 1.5), ("session", 1.0), False), (("session", 1.0), ("household", 1.0), False),
])
def test_a_coarser_unit_keeps_a_finer_units_bound_only_at_half_the_clip(clipped, promised,
                                                                         kept) -> None:
    assert bounds(*clipped, *promised) is kept


def test_removing_one_session_moves_a_clipped_user_by_up_to_twice_the_clip() -> None:
    # Why `bounds` halves the clip for a coarser unit: the add/remove sensitivity.
    opposite = [Contribution("s1", "bob", np.array([3.0, 0.0])),
                Contribution("s2", "bob", np.array([-1.0, 0.0]))]
    both, _ = clip_and_sum(opposite, clip_norm=1.0, unit="user")
    alone, _ = clip_and_sum(opposite[1:], clip_norm=1.0, unit="user")
    assert np.linalg.norm(both - alone) == pytest.approx(2.0)


def test_discrete_gaussian_moments_and_support() -> None:
    rng = np.random.default_rng(0)
    draws = sample_discrete_gaussian(7.5, 200_000, rng)
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 0.1
    assert draws.std() == pytest.approx(7.5, rel=0.01)
    assert np.abs(draws).max() <= 12 * 7.5
    assert sample_discrete_gaussian(0.0, 4).tolist() == [0, 0, 0, 0]


def test_distributed_noise_sums_to_the_full_noise() -> None:
    config = DPConfig(clip_norm=1.0, noise_multiplier=2.0, expected_cohort=16)
    code = config.fixed_point(clip=1.0)
    rng = np.random.default_rng(1)
    ring_sum = np.zeros(20_000, np.uint32)
    for _ in range(16):
        ring_sum += code.encode(np.zeros(20_000), rng, distributed_noise(config, code, 20_000, rng))
    noise = code.decode_sum(ring_sum)
    assert noise.std() == pytest.approx(config.noise_stddev, rel=0.02)


def test_effective_noise_after_dropouts() -> None:
    config = DPConfig(1.0, 2.0, expected_cohort=16)
    assert config.effective_noise_multiplier(16) == 2.0
    assert config.effective_noise_multiplier(4) == pytest.approx(1.0)
    local = DPConfig(1.0, 2.0, mode="local")
    assert local.effective_noise_multiplier(4) == pytest.approx(4.0)


def test_central_and_local_modes() -> None:
    rng = np.random.default_rng(2)
    central = DPConfig(1.0, 3.0, mode="central")
    vector = np.zeros(50_000, np.float32)
    assert noise_for_site(vector, central, rng) is vector
    assert noise_for_aggregator(vector, central, rng).std() == pytest.approx(3.0, rel=0.02)
    local = DPConfig(1.0, 3.0, mode="local")
    assert noise_for_site(vector, local, rng).std() == pytest.approx(3.0, rel=0.02)
    assert noise_for_aggregator(vector, local, rng) is vector
    with pytest.raises(ValueError):
        distributed_noise(local, local.fixed_point(1.0), 3, rng)


@pytest.mark.parametrize("kwargs", [{"clip_norm": 0.0, "noise_multiplier": 1.0},
                                    {"clip_norm": 1.0, "noise_multiplier": -1.0},
                                    {"clip_norm": 1.0, "noise_multiplier": 1.0, "unit": "row"},
                                    {"clip_norm": 1.0, "noise_multiplier": 1.0, "mode": "x"}])
def test_bad_configs_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        DPConfig(**kwargs)


def test_one_session_hides_in_the_noise_five_sessions_stand_clear() -> None:
    """The point of session-level DP: a value one user said once moves the noised sum by
    less than the noise; a value five sessions state stands clear of it."""
    clip, sites, dimension, trials = 1.0, 4, 512, 64
    config = DPConfig(clip_norm=clip, noise_multiplier=1.5, unit="session",
                      expected_cohort=sites)
    # The ring code bounds a site's summed coordinates, not one unit's: up to 15 units here.
    code = config.fixed_point(clip=15 * clip)
    rng = np.random.default_rng(3)
    secret = np.zeros(dimension)
    secret[7] = 1.0  # the direction in parameter space that encodes the value

    def noised_sum(sessions_stating_it: int) -> np.ndarray:
        ring_sum = np.zeros(dimension, np.uint32)
        for site in range(sites):
            contributions = [Contribution(f"{site}-{i}", f"user-{site}-{i}",
                                          rng.normal(0, 0.02, dimension)) for i in range(10)]
            if site == 0:  # the sessions stating the value sit at one site
                contributions += [Contribution(f"says-{i}", f"sayer-{i}", 5.0 * secret)
                                  for i in range(sessions_stating_it)]
            total, _ = clip_and_sum(contributions, clip, unit="session")
            ring_sum += code.encode(total, rng, distributed_noise(config, code, dimension, rng))
        return code.decode_sum(ring_sum)

    baseline = np.array([noised_sum(0)[7] for _ in range(trials)])
    once = np.array([noised_sum(1)[7] for _ in range(trials)])
    five = np.array([noised_sum(5)[7] for _ in range(trials)])
    noise = baseline.std()
    assert noise == pytest.approx(config.noise_stddev, rel=0.25)
    shift_once = once.mean() - baseline.mean()
    shift_five = five.mean() - baseline.mean()
    assert shift_once == pytest.approx(clip, abs=0.5)  # clipped: moves the sum by <= C
    assert shift_once < noise  # below the noise: deniable
    assert shift_five > 3 * noise  # stands clear
    # and in a single round: the one-session value is usually lost, five sessions not
    threshold = baseline.mean() + 2 * noise
    assert (once > threshold).mean() < 0.3
    assert (five > threshold).mean() > 0.9
    assert math.isfinite(noise)
