"""Who masks with whom: the SecAgg+ sparse neighbour graph, or the full graph.

SecAgg (Bonawitz et al. 2017) pairs every site with every other: O(n) key agreements,
mask expansions and shares per site. SecAgg+ (Bell et al. 2020) pairs each site only with
its k neighbours on a randomly permuted ring (a Harary graph), k = O(log n): each site's
secrets are shared among its neighbours only, with threshold t of k.

`secagg_plus_degree` picks the smallest k for which, when each site drops independently
with probability `dropout_rate`, the chance that some site keeps fewer than t surviving
neighbours (so its masks cannot be removed and the round fails) is at most
2^-`failure_log2`. With t = k//2 + 1, failure 2^-20 and 10% dropouts that is k = 32 for 64
sites, 36 for 256, 42 for 10,000 (logarithmic); at 30% dropouts, k = 196 for 256 sites.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType


def majority_threshold(degree: int) -> int:
    """t = k//2 + 1: a server that asks for both kinds of share cannot get t of each."""
    return degree // 2 + 1


def _too_few_survive(degree: int, threshold: int, survive: float) -> float:
    """P[Binomial(degree, survive) < threshold]."""
    return sum(math.comb(degree, i) * survive**i * (1 - survive) ** (degree - i)
               for i in range(threshold))


def secagg_plus_degree(cohort_size: int, dropout_rate: float = 0.1,
                       failure_log2: int = 20) -> int:
    """Smallest even neighbour count k (or cohort_size - 1, the full graph) that survives
    `dropout_rate` except with probability 2^-failure_log2, union-bounded over the cohort."""
    if cohort_size < 2:
        raise ValueError(f"cohort_size={cohort_size}: secure aggregation needs 2 sites")
    if not 0 <= dropout_rate < 0.5:
        raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 0.5): a majority "
                         "threshold cannot survive losing half the neighbours")
    budget = 2.0**-failure_log2 / cohort_size
    for degree in range(2, cohort_size - 1, 2):
        if _too_few_survive(degree, majority_threshold(degree), 1 - dropout_rate) <= budget:
            return degree
    return cohort_size - 1


@dataclass(frozen=True)
class NeighbourGraph:
    """Undirected graph over site ids; `neighbours[s]` excludes s itself."""

    neighbours: Mapping[int, frozenset[int]]

    def __post_init__(self) -> None:
        frozen = MappingProxyType({site: frozenset(peers)
                                   for site, peers in self.neighbours.items()})
        object.__setattr__(self, "neighbours", frozen)
        for site, peers in frozen.items():
            if site < 1:
                raise ValueError(f"site id {site} must be >= 1 (it is a Shamir x-coordinate)")
            if site in peers:
                raise ValueError(f"site {site} lists itself as a neighbour")
            for peer in peers:
                if site not in frozen.get(peer, ()):
                    raise ValueError(f"edge {site}-{peer} is not symmetric")

    @cached_property  # the graph never changes: computed once (writes __dict__ directly)
    def sites(self) -> frozenset[int]:
        return frozenset(self.neighbours)

    @cached_property
    def min_degree(self) -> int:
        return min(len(peers) for peers in self.neighbours.values())

    @classmethod
    def full(cls, sites: Iterable[int]) -> NeighbourGraph:
        """Every site paired with every other (SecAgg): best for small cohorts."""
        cohort = frozenset(sites)
        return cls({site: cohort - {site} for site in cohort})

    @classmethod
    def harary(cls, sites: Iterable[int], degree: int, seed: int | None = None) -> NeighbourGraph:
        """SecAgg+: sites on a randomly permuted ring, each joined to degree/2 on either
        side. The permutation hides who neighbours whom from an adversary choosing
        corruptions in advance; `seed` is for tests only (default: OS randomness)."""
        ring = sorted(set(sites))
        if degree >= len(ring) - 1:
            return cls.full(ring)
        if degree < 2 or degree % 2:
            raise ValueError(f"degree={degree} must be even and >= 2")
        shuffler = random.Random(seed) if seed is not None else random.Random(secrets.randbits(128))
        shuffler.shuffle(ring)
        half = degree // 2
        size = len(ring)
        return cls({site: frozenset(ring[(index + offset) % size]
                                    for offset in range(-half, half + 1) if offset)
                    for index, site in enumerate(ring)})
