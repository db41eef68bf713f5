"""What a refusal must leave as it was, checked on a live aggregator; and the forgeries of
an encoded update's ring words that a hostile site sends (masked or, without secure
aggregation, plain)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc


def snapshot(running: Any) -> tuple:
    """Everything a refusal must leave as it was (`running`: a RunningServer)."""
    coordinator = running.coordinator
    head = coordinator.ledger.head()
    return (len(coordinator.enrolments), coordinator.waiting().ready_sites,
            tuple(coordinator.registry.numbers()), None if head is None else head.index,
            coordinator.current_round(), len(coordinator.budget.charges),
            len(coordinator.rejected()),
            (coordinator.data_dir / "coordinator.json").read_bytes())


def assert_healthy(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


Forge = Callable[[np.ndarray, int], np.ndarray]


def weight_word(value_in_weights: float) -> Forge:
    """forge(ring, weight scale): the ring with its weight word set to `value_in_weights`."""
    def forge(ring: np.ndarray, scale: int) -> np.ndarray:
        ring = ring.copy()
        ring[-1] = int(value_in_weights * scale)
        return ring
    return forge


def inflate(ring: np.ndarray, scale: int) -> np.ndarray:
    """The ring with every delta word (signed) a hundred times larger."""
    ring = ring.copy()
    ring[:-1] = np.where(ring[:-1] >= 1 << 31, ring[:-1] - (1 << 32), ring[:-1]) * 100
    return ring
