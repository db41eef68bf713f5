"""One fix to Flower 1.42's simulation engine, for fleets of hundreds of virtual sites.

The engine hands messages to the ClientApp workers from a loop
(`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`) that, every 0.1 s, asks
the in-memory LinkState for the next message of each node in turn
(`InMemoryLinkState.get_message_ins(node, limit=1)`); each such call walks the whole
message store, running the store's expiry check on every message it passes, under the
store's lock. With N nodes and N messages pending (every phase of a round sends one message
to every sampled node, and a message stays in the store until its reply is pulled) one
sweep costs N² checks: 0.05 s at 100 nodes, 5 s at 1,000 (measured here, 2026-12-06), run
back to back for as long as a phase lasts, on one of the machine's cores and holding the
lock the replies need to be stored.

`fast_message_sweep()` replaces that loop, while a simulation runs, with one that sweeps
the store once: the same expiry check on every stored message (one call, as the per-node
walks did between them), then each node's first undelivered message in the store's order,
marked delivered and queued in the nodes' order, exactly what the per-node calls return.
Nothing else of Flower changes. It applies only where the engine is the one it was written
against (the loop and the store's fields as in flwr 1.42); elsewhere Flower's own loop runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from queue import Queue
from typing import Any

# The loop's name in the engine module, and the InMemoryLinkState members the sweep uses.
_LOOP = "add_messages_to_queue"
_STATE_FIELDS = ("lock", "message_ins_store", "_check_stored_messages")


def next_messages(state: Any, nodes: Mapping[int, Any]) -> list[Any]:
    """Each node's next undelivered message (the first for it in the store's order), in
    the order of `nodes`, marked delivered: what `state.get_message_ins(node, limit=1)`
    returns for every node in turn, in one pass over the store. Every stored message is
    first run through the store's own expiry check, which deletes the expired ones (the
    per-node walks ran it on each message they passed)."""
    from flwr.supercore.date import now

    picked: dict[int, Any] = {}
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))
        for message in list(state.message_ins_store.values()):
            node = message.metadata.dst_node_id
            if message.metadata.delivered_at == "" and node in nodes and node not in picked:
                picked[node] = message
    delivered_at = now().isoformat()
    for message in picked.values():
        message.metadata.delivered_at = delivered_at
    return [picked[node] for node in nodes if node in picked]


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, Any],
                          f_stop: threading.Event) -> None:
    """The engine's loop (`vce_api.add_messages_to_queue`'s signature and pace), one pass
    over the store a sweep."""
    while not f_stop.is_set():
        for message in next_messages(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(0.1)


def applies() -> bool:
    """Whether the running Flower has the loop and the store this replaces."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return False
    state_fields = set(vars(InMemoryLinkState)) | set(InMemoryLinkState.__init__.__code__
                                                      .co_names)
    return callable(getattr(vce_api, _LOOP, None)) and all(
        name in state_fields for name in _STATE_FIELDS)


@contextmanager
def fast_message_sweep() -> Iterator[bool]:
    """Within the block, the simulation engine sweeps its message store once a sweep
    (`add_messages_to_queue` here); yields whether it does (False: this Flower is not the
    one the sweep was written against, and its own loop runs). Restored on exit."""
    if not applies():
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, _LOOP)
    setattr(vce_api, _LOOP, add_messages_to_queue)
    try:
        yield True
    finally:
        setattr(vce_api, _LOOP, original)
