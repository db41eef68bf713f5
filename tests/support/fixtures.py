"""Fixtures every test folder sees (registered by tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_model_dir() -> Path:
    """The committed (or cached) toy base model; a test run never rebuilds it."""
    from fleetmind.sim.basemodel import toy_model_path

    return toy_model_path(build=False)


@pytest.fixture(scope="session")
def toy_model(toy_model_dir):
    from fleetmind.client.model import load_model

    return load_model(toy_model_dir)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    """A fresh Ed25519 signing key (a ledger's, an outbox's, a registry's)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture
def serve_aggregator() -> Iterator[Callable[..., object]]:
    """serve_aggregator(config, limits=None): `fleetmind.server.service.serve` in this
    process; every aggregator it started is stopped at teardown."""
    from fleetmind.server.service import serve

    started = []

    def start(config, limits=None):
        running = serve(config, limits)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop(grace=None)


@pytest.fixture
def aggregator(aggregator_config, serve_aggregator):
    """The aggregator of a test module, from the `aggregator_config` fixture it defines
    (parametrize that one, indirectly, for a variant)."""
    return serve_aggregator(aggregator_config)


@pytest.fixture
def channel(aggregator) -> Iterator[object]:
    """A plaintext gRPC channel to `aggregator`, closed before the aggregator stops."""
    import grpc

    with grpc.insecure_channel(aggregator.address) as opened:
        yield opened


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every Message with the running task's identity; outside a run there
    is none, so the tests give them one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
