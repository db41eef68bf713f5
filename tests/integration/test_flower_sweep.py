"""The simulation engine's message sweep (sim/flower_sweep.py): one pass over Flower's
in-memory message store hands out what Flower's per-node walks hand out, in the same
order, deletes expired messages as they do, and is installed only for the block."""

from __future__ import annotations

import threading
import time
from queue import Queue
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fleetmind.sim import flower_sweep


def _store(nodes: int) -> tuple[Any, dict[int, int], InMemoryGrid]:
    """An in-memory LinkState with a run and `nodes` registered nodes, as Flower's
    simulation builds it (flwr/simulation/run_simulation.py), and a grid on it."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id,
                                                 run_id=run.run_id)
    mapping = vce_api._register_nodes(nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, mapping, grid


def _push(grid: InMemoryGrid, nodes: list[int], kind: str, ttl: float | None = None) -> None:
    TaskIdentity.run_id = grid.run.run_id  # a Message takes its run from the task identity
    messages = [Message(RecordDict({"c": ConfigRecord({"kind": kind})}), dst_node_id=node,
                        message_type="train", ttl=ttl) for node in nodes]
    grid.push_messages(messages)


def _flower_sweep(state: Any, mapping: dict[int, int]) -> list[Message]:
    """One sweep of Flower's own loop (vce_api.add_messages_to_queue)."""
    return [message for node in mapping
            for message in state.get_message_ins(node_id=node, limit=1)]


def _seen(messages: list[Message]) -> list[tuple[int, object]]:
    return [(m.metadata.dst_node_id, m.content.config_records["c"]["kind"])
            for m in messages]


def _scenario(state: Any, mapping: dict[int, int], grid: InMemoryGrid) -> list[int]:
    """Two messages for some nodes, one for others, none for the rest, one expiring."""
    nodes = list(mapping)
    _push(grid, nodes[::2], "first")
    _push(grid, nodes[1::3], "first")
    _push(grid, nodes[::2], "second")
    _push(grid, nodes[5:6], "expiring", ttl=0.05)
    return nodes


def test_one_pass_hands_out_what_flowers_walks_hand_out() -> None:
    ours, ours_nodes, ours_grid = _store(12)
    theirs, their_nodes, their_grid = _store(12)
    _scenario(ours, ours_nodes, ours_grid)
    _scenario(theirs, their_nodes, their_grid)
    time.sleep(0.1)  # the expiring message has expired
    ours_rank = {node: i for i, node in enumerate(ours_nodes)}
    theirs_rank = {node: i for i, node in enumerate(their_nodes)}
    for _ in range(3):  # until both stores have nothing undelivered
        got = flower_sweep.next_messages(ours, ours_nodes)
        expected = _flower_sweep(theirs, their_nodes)
        assert [(ours_rank[n], k) for n, k in _seen(got)] == \
            [(theirs_rank[n], k) for n, k in _seen(expected)]
        assert all(m.metadata.delivered_at != "" for m in got)
    assert flower_sweep.next_messages(ours, ours_nodes) == []
    # The expired message was deleted by both, never handed out.
    assert len(ours.message_ins_store) == len(theirs.message_ins_store) == 6 + 4 + 6


def test_installed_only_within_the_block_and_delivers() -> None:
    assert flower_sweep.applies()
    original = vce_api.add_messages_to_queue
    with flower_sweep.fast_message_sweep() as installed:
        assert installed
        assert vce_api.add_messages_to_queue is flower_sweep.add_messages_to_queue
        state, mapping, grid = _store(5)
        _push(grid, list(mapping), "first")
        queue: Queue[Message] = Queue()
        stop = threading.Event()
        loop = threading.Thread(target=vce_api.add_messages_to_queue,
                                args=(state, queue, mapping, stop))
        loop.start()
        try:
            got = [queue.get(timeout=5) for _ in mapping]
        finally:
            stop.set()
            loop.join()
        assert sorted(m.metadata.dst_node_id for m in got) == sorted(mapping)
        assert queue.empty()
    assert vce_api.add_messages_to_queue is original


def test_a_sweep_of_many_nodes_is_linear() -> None:
    """300 nodes, 300 messages stored and delivered: Flower's walks cost 300² checks a
    sweep (0.4 s here), one pass 300."""
    state, mapping, grid = _store(300)
    _push(grid, list(mapping), "first")
    assert len(flower_sweep.next_messages(state, mapping)) == 300
    started = time.perf_counter()
    assert flower_sweep.next_messages(state, mapping) == []
    ours = time.perf_counter() - started
    started = time.perf_counter()
    assert _flower_sweep(state, mapping) == []
    theirs = time.perf_counter() - started
    assert ours * 5 < theirs
