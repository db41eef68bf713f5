"""Loopback ports and refused gRPC calls."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc
import pytest


def free_port() -> int:
    """A loopback port free now (for a program that must be told its port up front)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The error `call` is refused with; a streamed reply is read to its end first."""
    with pytest.raises(grpc.RpcError) as refusal:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return refusal.value


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status `call` is refused with."""
    return refused(call).code()


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> None:
    """Waits for `check()` to hold, failing after `seconds` (a guard against a hang, not a
    measure of speed)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"condition not reached in {seconds} s"
        time.sleep(0.05)
