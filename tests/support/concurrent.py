"""Sites that act at the same time, one thread each: what each returned, or the error it
raised (kept, with the site it came from, for the test to check)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def at_once(count: int, work: Callable[[int], T], join_s: float = 60.0
            ) -> list[T | BaseException | None]:
    """work(0), ..., work(count - 1), each in its own thread; each one's result or the error
    it raised, in order (None where a thread was still running after join_s)."""
    results: dict[int, T | BaseException] = {}

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as error:  # surfaced to the caller, with the site it came from
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(join_s)
    return [results.get(i) for i in range(count)]


def each_returned(results: list[Any], kind: type[T], names: list[str] | None = None
                  ) -> list[T]:
    """`results`, having checked that every one is a `kind` (the site's name, or its index,
    and what came back instead, where one is not)."""
    for i, result in enumerate(results):
        assert isinstance(result, kind), (names[i] if names else i, result)
    return results


def run_once_each(address: str, configs: list[Any], join_s: float = 180.0) -> list[Any]:
    """`client.site.run_once` for every site config at once, each on its own plaintext
    channel to `address`: each one's Outcome or error."""
    import grpc

    from fleetmind.client.site import run_once

    def one(i: int) -> Any:
        with grpc.insecure_channel(address) as channel:
            return run_once(configs[i], channel)

    return at_once(len(configs), one, join_s)


def stocked(configs: list[Any], sites: list[Any]) -> list[tuple[str, ...]]:
    """Each site's data_dir made, with its world site's sessions in its store; the ids
    stored, sorted (the store skips a session whose content repeats)."""
    from fleetmind.client.store import SessionStore

    stored = []
    for config, site in zip(configs, sites, strict=True):
        config.data_dir.mkdir()  # a folder, so the store is sessions.db inside it
        with SessionStore(config.data_dir) as store:
            stored.append(tuple(sorted(s["id"] for s in site.sessions if store.add(s))))
    return stored
