"""The exact frozen-A LoRA merge, server optimisers, staleness weights, the FedIT baseline.

With A frozen (FFA-LoRA, arXiv 2403.12313) every site's weight delta is dB_i·A with the
same A, so the weighted mean of the deltas is (sum_i w_i dB_i / sum_i w_i)·A exactly:
a linear function of the B deltas, which secure aggregation can compute from a sum.

    B_new = B + eta * sum_i w_i dB_i / sum_i w_i            (FedAvg, server rate eta)

`cohort_step` shrinks eta for a round that sums more privacy units than it was tuned at.

FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization") treats the mean delta as
a pseudo-gradient and applies Adam's moments to it on the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.update import Update

Tensors = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


def staleness_weight(staleness: int) -> float:
    """FedBuff's 1/sqrt(1 + tau) for a delta computed `staleness` versions ago. The site
    applies it before masking: under secure aggregation the server cannot weight."""
    if staleness < 0:
        raise ValueError(f"staleness={staleness} must be >= 0")
    return 1.0 / math.sqrt(1.0 + staleness)


def flatten(tensors: Tensors, shapes: Shapes) -> np.ndarray:
    """One float32 vector, tensors in sorted-name order: the order every party uses."""
    if set(tensors) != set(shapes):
        raise ValueError(f"tensor names {sorted(tensors)} != expected {sorted(shapes)}")
    return np.concatenate([np.asarray(tensors[name], dtype=np.float32).reshape(-1)
                           for name in sorted(shapes)])


def unflatten(vector: np.ndarray, shapes: Shapes) -> dict[str, np.ndarray]:
    """Inverse of `flatten`."""
    sizes = [math.prod(shapes[name]) for name in sorted(shapes)]
    if vector.shape != (sum(sizes),):
        raise ValueError(f"vector has shape {vector.shape}, the shapes need ({sum(sizes)},)")
    out, start = {}, 0
    for name, size in zip(sorted(shapes), sizes, strict=True):
        out[name] = vector[start:start + size].reshape(shapes[name])
        start += size
    return out


def weighted_delta_sum(updates: Sequence[Update]) -> tuple[dict[str, np.ndarray], float]:
    """(sum_i w_i dB_i, sum_i w_i) in float64: the plaintext path, without secure
    aggregation. Validate the updates against the global shapes first."""
    if not updates:
        raise ValueError("no updates to sum")
    names = set(updates[0].tensors)
    total = {name: np.zeros(updates[0].tensors[name].shape) for name in names}
    weight_sum = 0.0
    for update in updates:
        if set(update.tensors) != names:
            raise ValueError(f"update from {update.metadata.site!r} has other tensor names")
        for name in names:
            total[name] += update.metadata.weight * update.tensors[name]
        weight_sum += update.metadata.weight
    return total, weight_sum


def mean_delta(weighted_sum: Tensors, weight_sum: float) -> dict[str, np.ndarray]:
    if not weight_sum > 0:
        raise ValueError(f"weight_sum={weight_sum} must be > 0")
    return {name: (np.asarray(total) / weight_sum).astype(np.float32)
            for name, total in weighted_sum.items()}


# --- secure-aggregation payload: weighted delta and weight in one ring vector -------------


def secagg_payload(weighted_delta: np.ndarray, weight: float, delta_code: FixedPoint,
                   weight_code: FixedPoint, rng: np.random.Generator | None = None,
                   integer_noise: np.ndarray | None = None) -> np.ndarray:
    """Ring words of (w_i·dB_i flattened, w_i): the last word carries the weight, in its own
    fixed-point code, so the unmasked sum yields both sum_i w_i dB_i and sum_i w_i."""
    if not 0 < weight <= weight_code.clip:
        raise ValueError(f"weight={weight} must be in (0, {weight_code.clip}]")
    return np.concatenate([delta_code.encode(weighted_delta, rng, integer_noise),
                           weight_code.encode(np.array([weight]), rng)])


def open_secagg_sum(ring_sum: np.ndarray, shapes: Shapes, delta_code: FixedPoint,
                    weight_code: FixedPoint) -> tuple[dict[str, np.ndarray], float]:
    """(sum_i w_i dB_i as tensors, sum_i w_i) from the unmasked ring sum."""
    weighted = delta_code.decode_sum(ring_sum[:-1])
    weight_sum = float(weight_code.decode_sum(ring_sum[-1:])[0])
    return unflatten(weighted, shapes), weight_sum


# --- server optimisers on the pseudo-gradient (the mean delta) ---------------------------


def cohort_step(learning_rate: float, units: int, reference_units: int | None) -> float:
    """The server rate for a round whose sum holds `units` privacy units' deltas: the rate
    tuned at `reference_units`, times reference_units / units past it (never more). Users
    who state the same fact send aligned deltas, which add as their number, not its square
    root: with sqrt(reference / units), sixteen users a fact lost 14 points of in-context
    skill in a round where eight kept it (docs/continual.md, "A step for the users who
    agree"). reference_units None: every round steps `learning_rate`."""
    if reference_units is None or units <= reference_units:
        return learning_rate
    return learning_rate * reference_units / units


@dataclass(frozen=True)
class FedAvg:
    """B_new = B + learning_rate * mean delta. With learning_rate 1 this is plain FedAvg."""

    learning_rate: float = 1.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")

    def step(self, weights: Tensors, mean: Tensors,
             state: AdamMoments | None = None) -> tuple[dict[str, np.ndarray], None]:
        """Plain FedAvg keeps no state: `state` is accepted (and ignored) so both
        optimisers share one signature."""
        return {name: (weights[name] + self.learning_rate * mean[name]).astype(np.float32)
                for name in weights}, None


@dataclass(frozen=True)
class AdamMoments:
    """FedAdam's server state: first and second moments of the pseudo-gradient."""

    first: Mapping[str, np.ndarray]
    second: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        object.__setattr__(self, "first", MappingProxyType(dict(self.first)))
        object.__setattr__(self, "second", MappingProxyType(dict(self.second)))


@dataclass(frozen=True)
class FedAdam:
    """Reddi et al. 2021, Algorithm 2: m = b1 m + (1-b1) D; v = b2 v + (1-b2) D^2;
    B += lr * m / (sqrt(v) + tau). Defaults are the paper's (tau = 1e-3, b1 0.9, b2 0.99);
    as in the paper there is no bias correction."""

    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not self.learning_rate > 0 or not self.tau > 0:
            raise ValueError(f"learning_rate={self.learning_rate} and tau={self.tau} must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")

    def step(self, weights: Tensors, mean: Tensors,
             state: AdamMoments | None = None) -> tuple[dict[str, np.ndarray], AdamMoments]:
        if state is None:
            state = AdamMoments({n: np.zeros_like(w, np.float32) for n, w in weights.items()},
                                {n: np.zeros_like(w, np.float32) for n, w in weights.items()})
        first, second, new = {}, {}, {}
        for name in weights:
            first[name] = self.beta1 * state.first[name] + (1 - self.beta1) * mean[name]
            second[name] = self.beta2 * state.second[name] + (1 - self.beta2) * mean[name] ** 2
            new[name] = (weights[name] + self.learning_rate * first[name]
                         / (np.sqrt(second[name]) + self.tau)).astype(np.float32)
        return new, AdamMoments(first, second)


def exact_merge(global_b: Tensors, weighted_sum: Tensors, weight_sum: float,
                optimizer: FedAvg | FedAdam,
                state: AdamMoments | None = None
                ) -> tuple[dict[str, np.ndarray], AdamMoments | None]:
    """New B (and optimiser state) from the cohort's weighted delta sum."""
    return optimizer.step(global_b, mean_delta(weighted_sum, weight_sum), state)


# --- the baseline the benchmark compares against --------------------------------------


def fedit_baseline_merge(factors_a: Sequence[np.ndarray],
                         factors_b: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """BASELINE ONLY (FedIT): average A and B separately, as if both were trained. Wrong
    in general, since mean(B_i)·mean(A_i) != mean(B_i·A_i); kept to measure how wrong."""
    return np.mean(factors_a, axis=0), np.mean(factors_b, axis=0)
