"""Whole cohorts through every phase: the unmasked sum is the plaintext sum of the
survivors within the quantisation bound, with dropouts at each phase; the server refuses
small cohorts and never holds an individual vector."""

import dataclasses

import numpy as np
import pytest

from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.secagg import (
    Dropouts,
    NeighbourGraph,
    RoundConfig,
    ServerAborted,
    ServerCompleted,
    crypto,
    majority_threshold,
    run_round,
    secagg_plus_degree,
)
from fleetmind.aggregation.secagg.loopback import PHASES

LENGTH = 257


def make_round(cohort: int, *, design_dropout: float = 0.1, min_cohort: int = 2,
               ring_bits: int = 32, round_id: int = 7):
    identities = {site: crypto.new_identity() for site in range(1, cohort + 1)}
    degree = secagg_plus_degree(cohort, design_dropout)
    graph = NeighbourGraph.harary(identities, degree, seed=cohort)
    config = RoundConfig(round_id, graph, majority_threshold(graph.min_degree), min_cohort,
                         LENGTH, ring_bits,
                         {s: crypto.identity_public_bytes(k) for s, k in identities.items()})
    return config, identities


def encode_inputs(cohort: int, code: FixedPoint, seed: int):
    rng = np.random.default_rng(seed)
    values = {site: rng.uniform(-code.clip, code.clip, LENGTH) for site in range(1, cohort + 1)}
    return values, {site: code.encode(v, rng) for site, v in values.items()}


def pick_dropouts(cohort: int, rate: float, phases, seed: int) -> Dropouts:
    rng = np.random.default_rng(seed)
    remaining = list(range(1, cohort + 1))
    before = {}
    for phase in phases:
        count = round(rate * len(remaining))
        chosen = set(rng.choice(remaining, size=count, replace=False).tolist())
        before[phase] = frozenset(chosen)
        remaining = [s for s in remaining if s not in chosen]
    return Dropouts(before)


def check_sum(cohort: int, rate: float, phases, design_dropout: float) -> ServerCompleted:
    config, identities = make_round(cohort, design_dropout=design_dropout)
    code = FixedPoint(clip=1.0, cohort_max=cohort)
    values, ring = encode_inputs(cohort, code, seed=cohort)
    dropouts = pick_dropouts(cohort, rate, phases, seed=cohort)
    result = run_round(config, identities, ring, dropouts).result
    assert isinstance(result, ServerCompleted), getattr(result, "reason", "")
    # A site that drops before unmasking has already sent its masked input: it counts.
    gone_before_input = set().union(*(dropouts.at(p) for p in PHASES[:3]))
    assert result.contributors == set(values) - gone_before_input
    plain = sum(values[site] for site in result.contributors)
    error = np.abs(code.decode_sum(result.cohort_sum) - plain)
    assert error.max() <= code.sum_error_bound(len(result.contributors))
    return result


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_sum_of_20_sites_with_dropouts_at_each_phase(rate, phase) -> None:
    check_sum(20, rate, [phase], design_dropout=max(rate, 0.1))


def test_sum_of_20_sites_with_dropouts_at_every_phase() -> None:
    result = check_sum(20, 0.1, PHASES, design_dropout=0.3)
    assert len(result.contributors) == 14


def test_three_sites_without_dropouts() -> None:
    check_sum(3, 0.0, [], design_dropout=0.1)


@pytest.mark.parametrize("phase", PHASES)
def test_three_sites_cannot_lose_one(phase) -> None:
    # t = 2 of 2 neighbours: a dropout leaves some secret below threshold; no sum comes out.
    config, identities = make_round(3)
    _, ring = encode_inputs(3, FixedPoint(1.0, 3), seed=0)
    report = run_round(config, identities, ring, Dropouts({phase: frozenset({2})}))
    assert isinstance(report.result, ServerAborted)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_sum_of_100_sites_with_dropouts_at_each_phase(rate, phase) -> None:
    check_sum(100, rate, [phase], design_dropout=max(rate, 0.1))


def test_100_sites_on_the_sparse_graph() -> None:
    config, _ = make_round(100, design_dropout=0.1)
    assert config.graph.min_degree < 40  # SecAgg+, not all pairs
    check_sum(100, 0.1, ["masked_input"], design_dropout=0.1)


def test_server_refuses_to_unmask_below_the_minimum_cohort() -> None:
    config, identities = make_round(20, min_cohort=15, design_dropout=0.3)
    _, ring = encode_inputs(20, FixedPoint(1.0, 20), seed=1)
    report = run_round(config, identities, ring,
                       Dropouts({"masked_input": frozenset(range(1, 7))}))
    assert isinstance(report.result, ServerAborted)
    assert report.result.phase == "masked_input_collection"
    assert "14 masked inputs, minimum cohort 15" in report.result.reason
    assert not any(type(state).__name__ == "ServerUnmasking" for state in report.server_states)


def test_heavy_dropouts_at_every_phase_abort() -> None:
    config, identities = make_round(20, design_dropout=0.3)
    _, ring = encode_inputs(20, FixedPoint(1.0, 20), seed=2)
    report = run_round(config, identities, ring, pick_dropouts(20, 0.3, PHASES, seed=2))
    assert isinstance(report.result, ServerAborted)


def arrays_in(value, seen=None):
    """Every numpy array reachable from a server state object."""
    seen = seen if seen is not None else set()
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from arrays_in(getattr(value, field.name), seen)
    elif isinstance(value, dict) or hasattr(value, "items"):
        for key, item in value.items():
            yield from arrays_in(key, seen)
            yield from arrays_in(item, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from arrays_in(item, seen)
    elif hasattr(value, "__dict__"):
        yield from arrays_in(vars(value), seen)


def test_server_never_holds_an_individual_vector() -> None:
    config, identities = make_round(6)
    _, ring = encode_inputs(6, FixedPoint(1.0, 6), seed=3)
    report = run_round(config, identities, ring, Dropouts({"unmasking": frozenset({4})}))
    assert isinstance(report.result, ServerCompleted)
    plaintext_sum = sum(ring[s].astype(np.uint64) for s in report.result.contributors) % 2**32
    for state in report.server_states:
        held = [a for a in arrays_in(state) if a.size == LENGTH]
        assert len(held) <= 1, type(state).__name__  # at most the one running sum
        for array in held:
            for vector in ring.values():
                assert not np.array_equal(array, vector), type(state).__name__
    np.testing.assert_array_equal(report.result.cohort_sum, plaintext_sum)
