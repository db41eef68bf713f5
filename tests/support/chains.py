"""Hash-chained, signed logs (the aggregator's ledger, a site's outbox): one filled for a
fixture, and the chain's shape checked."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any


def filled(log: Any, records: Iterable[Any]) -> Iterator[Any]:
    """For a fixture: `log`, opened, with each of `records` appended; closed after."""
    with log as opened:
        for record in records:
            opened.append(record)
        yield opened


def assert_chained(entries: list[Any], count: int, genesis: str) -> None:
    """`count` entries indexed from 0, the first after `genesis`, each after the one before."""
    assert [e.index for e in entries] == list(range(count))
    assert entries[0].prev_hash == genesis
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
