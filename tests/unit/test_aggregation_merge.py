import math

import numpy as np
import pytest

from fleetmind.aggregation.merge import (
    FedAdam,
    FedAvg,
    cohort_step,
    exact_merge,
    fedit_baseline_merge,
    flatten,
    mean_delta,
    open_secagg_sum,
    secagg_payload,
    staleness_weight,
    unflatten,
    weighted_delta_sum,
)
from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.update import Update, UpdateMetadata

SHAPES = {"b.q": (32, 8), "a.v": (24, 8)}


def site_updates(count: int, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [Update({name: rng.normal(0, 0.01, shape).astype(np.float32)
                    for name, shape in SHAPES.items()},
                   UpdateMetadata(f"s{i}", 0, weight=float(rng.uniform(0.2, 1.0))))
            for i in range(count)]


def test_staleness_weight_is_fedbuff() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_the_cohort_step_shrinks_as_the_units_grow_past_its_reference() -> None:
    assert cohort_step(4.0, 290, None) == 4.0  # no reference: never scaled
    assert cohort_step(4.0, 60, 100) == 4.0  # fewer units than tuned at: never larger
    assert cohort_step(4.0, 100, 100) == 4.0
    assert cohort_step(4.0, 400, 100) == pytest.approx(1.0)
    # Twice the users agreeing on each fact: twice the units, half the step, so a fact's
    # aligned deltas move B as far as before (docs/continual.md).
    assert cohort_step(4.0, 516, 117) * 16 == pytest.approx(cohort_step(4.0, 258, 117) * 8)


def test_flatten_round_trip_in_sorted_name_order() -> None:
    tensors = {name: np.arange(math.prod(s), dtype=np.float32).reshape(s)
               for name, s in SHAPES.items()}
    vector = flatten(tensors, SHAPES)
    assert vector.shape == (32 * 8 + 24 * 8,)
    np.testing.assert_array_equal(vector[:24 * 8], tensors["a.v"].reshape(-1))
    back = unflatten(vector, SHAPES)
    for name in SHAPES:
        np.testing.assert_array_equal(back[name], tensors[name])
    with pytest.raises(ValueError):
        unflatten(vector[:-1], SHAPES)


def test_frozen_a_merge_is_exact_and_fedit_is_not() -> None:
    rng = np.random.default_rng(1)
    rank, d_in, d_out, sites = 8, 64, 48, 8
    frozen_a = rng.normal(size=(rank, d_in)) / math.sqrt(d_in)
    global_b = np.zeros((d_out, rank), np.float32)
    deltas = [rng.normal(size=(d_out, rank)).astype(np.float32) for _ in range(sites)]
    updates = [Update({"m": d}, UpdateMetadata(f"s{i}", 0)) for i, d in enumerate(deltas)]
    total, weight = weighted_delta_sum(updates)
    merged_b, _ = exact_merge({"m": global_b}, total, weight, FedAvg(1.0))
    target = np.mean([(global_b + d) @ frozen_a for d in deltas], axis=0)
    ours = merged_b["m"] @ frozen_a
    assert np.linalg.norm(ours - target) / np.linalg.norm(target) < 1e-6
    # FedIT: every site trains its own A too; averaging factors separately is wrong.
    factors_a = [rng.normal(size=(rank, d_in)) / math.sqrt(d_in) for _ in range(sites)]
    target_fedit = np.mean([d @ a for d, a in zip(deltas, factors_a, strict=True)], axis=0)
    mean_a, mean_b = fedit_baseline_merge(factors_a, deltas)
    error = np.linalg.norm(mean_b @ mean_a - target_fedit) / np.linalg.norm(target_fedit)
    assert error > 0.3


def test_weighted_mean_and_fedavg_rate() -> None:
    updates = site_updates(4)
    total, weight = weighted_delta_sum(updates)
    expected = sum(u.metadata.weight * u.tensors["b.q"] for u in updates) / weight
    np.testing.assert_allclose(mean_delta(total, weight)["b.q"], expected, rtol=1e-5, atol=1e-9)
    zeros = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    merged, state = exact_merge(zeros, total, weight, FedAvg(0.5))
    assert state is None
    np.testing.assert_allclose(merged["b.q"], 0.5 * expected, rtol=1e-5, atol=1e-9)


def test_fedadam_follows_reddi_et_al() -> None:
    optimizer = FedAdam(learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    weights = {"m": np.ones(3, np.float32)}
    first, second, expected = np.zeros(3), np.zeros(3), np.ones(3)
    state = None
    for step in range(3):
        gradient = np.array([0.1, -0.2, 0.0]) * (step + 1)
        weights, state = optimizer.step(weights, {"m": gradient.astype(np.float32)}, state)
        first = 0.9 * first + 0.1 * gradient
        second = 0.99 * second + 0.01 * gradient**2
        expected = expected + 0.1 * first / (np.sqrt(second) + 1e-3)
        np.testing.assert_allclose(weights["m"], expected, rtol=1e-5)
    assert weights["m"][2] == 1.0  # a zero pseudo-gradient leaves the weight alone


def test_optimiser_configs_validated() -> None:
    with pytest.raises(ValueError):
        FedAvg(0.0)
    with pytest.raises(ValueError):
        FedAdam(beta1=1.0)


def test_secagg_payload_carries_weighted_delta_and_weight() -> None:
    updates = site_updates(5)
    delta_code = FixedPoint(clip=0.1, cohort_max=5)
    weight_code = FixedPoint(clip=1.0, cohort_max=5)
    rng = np.random.default_rng(0)
    ring_sum = np.zeros(32 * 8 + 24 * 8 + 1, np.uint32)
    for update in updates:
        weighted = update.metadata.weight * flatten(update.tensors, SHAPES)
        ring_sum += secagg_payload(weighted, update.metadata.weight, delta_code, weight_code, rng)
    total, weight = open_secagg_sum(ring_sum, SHAPES, delta_code, weight_code)
    expected_total, expected_weight = weighted_delta_sum(updates)
    assert weight == pytest.approx(expected_weight, abs=weight_code.sum_error_bound(5))
    for name in SHAPES:
        assert np.abs(total[name] - expected_total[name]).max() <= delta_code.sum_error_bound(5)
    with pytest.raises(ValueError, match="weight"):
        secagg_payload(np.zeros(3), 2.0, delta_code, weight_code)
