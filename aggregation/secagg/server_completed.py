"""The server's two final states: the unmasked cohort sum, or a refusal with its reason."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetmind.aggregation.secagg.messages import DropReason


@dataclass(frozen=True)
class ServerCompleted:
    """The sum over `contributors` of their ring vectors, mod 2^ring_bits: nothing else."""

    round_id: int
    cohort_sum: np.ndarray
    contributors: frozenset[int]
    dropped: frozenset[int]

    def __post_init__(self) -> None:
        self.cohort_sum.flags.writeable = False

    def pending(self) -> frozenset[int]:
        """A final state waits for nobody."""
        return frozenset()


@dataclass(frozen=True)
class ServerAborted:
    """The round ended without a sum in `phase`: `drop_reason` says why for programs,
    `reason` for people (naming sites and counts)."""

    round_id: int
    phase: str
    reason: str
    drop_reason: DropReason

    def pending(self) -> frozenset[int]:
        """A final state waits for nobody."""
        return frozenset()
