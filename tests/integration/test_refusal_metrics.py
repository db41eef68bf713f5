"""Every refusal is counted on the aggregator's /metrics page under a reason from a fixed
set: the test provokes refusals of different kinds over real loopback gRPC (a capacity cap,
bytes that do not parse, a quarantined site's join) and scrapes the counts."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from support.net import status_of

from fleetmind.aggregation.identity_proof import enroll_signed_bytes
from fleetmind.aggregation.secagg import crypto
from fleetmind.protos.fleetmind.v1 import fleet_pb2, fleet_pb2_grpc, models_pb2, models_pb2_grpc
from fleetmind.server.config import ServerConfig
from fleetmind.server.limits import ServerLimits
from fleetmind.server.metrics import REFUSAL_REASONS, ServerMetrics
from fleetmind.server.service import RunningServer, serve
from fleetmind.sim.bench.wire import SPEC

COUNTER = "fleetmind_aggregator_refusals_total"
GARBAGE = b"\xff\xff\xff\xff\x0f\x00garbage"  # an invalid tag, then noise


def refusals(running: RunningServer) -> dict[str, float]:
    """The refusal counter's value per reason, as Prometheus scrapes it."""
    assert running.metrics_endpoint is not None
    with urllib.request.urlopen(running.metrics_endpoint.url, timeout=5) as reply:
        text = reply.read().decode()
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == COUNTER}


def start(data: Path, limits: ServerLimits | None = None) -> RunningServer:
    return serve(ServerConfig(data_dir=data, listen="127.0.0.1:0", insecure=True,
                              metrics_listen="127.0.0.1:0", adapter=SPEC), limits)


def test_refusals_are_counted_by_reason_on_the_metrics_page(tmp_path: Path) -> None:
    running = start(tmp_path / "data", ServerLimits(max_streams=1))
    try:
        assert refusals(running) == dict.fromkeys(REFUSAL_REASONS, 0.0)  # every series, at 0
        with grpc.insecure_channel(running.address) as channel:
            enroll = channel.unary_unary("/fleetmind.v1.Fleet/Enroll")
            for _ in range(2):
                assert status_of(lambda: enroll(GARBAGE, timeout=5)) == \
                    grpc.StatusCode.INVALID_ARGUMENT
            models = models_pb2_grpc.ModelsStub(channel)
            held = models.Watch(models_pb2.WatchRequest(after_version=0), timeout=30)
            deadline = time.monotonic() + 10
            while running.capacity.open("stream") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # the one stream place is taken
            refused = models.Watch(models_pb2.WatchRequest(after_version=0), timeout=5)
            assert status_of(lambda: next(refused)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            held.cancel()
        counts = refusals(running)
        assert (counts["invalid_argument"], counts["capacity"]) == (2, 1)
        assert sum(counts.values()) == 3  # nothing else counted
    finally:
        running.stop(grace=None)


def test_a_quarantined_sites_join_is_counted_as_quarantined(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = start(data)
    try:
        with grpc.insecure_channel(running.address) as channel:
            key = Ed25519PrivateKey.generate()
            public = crypto.identity_public_bytes(key)
            site = fleet_pb2_grpc.FleetStub(channel).Enroll(fleet_pb2.EnrollRequest(
                site_name="site-a", identity_key=public,
                proof=key.sign(enroll_signed_bytes("site-a", public))), timeout=5).site
    finally:
        running.stop(grace=None)
    # Group testing pinned rejected rounds on the site (as coordinator.json keeps it).
    state = json.loads((data / "coordinator.json").read_text())
    state["quarantined"] = {str(site): "in every rejected cohort"}
    (data / "coordinator.json").write_text(json.dumps(state))
    running = start(data)
    try:
        with grpc.insecure_channel(running.address) as channel:
            join = fleet_pb2_grpc.FleetStub(channel).JoinRound(
                fleet_pb2.JoinRoundRequest(site=site, contributing_units=1), timeout=5)
            assert status_of(lambda: next(join)) == grpc.StatusCode.PERMISSION_DENIED
        counts = refusals(running)
        assert (counts["quarantined"], counts["permission_denied"]) == (1, 0)
    finally:
        running.stop(grace=None)


def test_the_reason_label_set_is_fixed() -> None:
    metrics = ServerMetrics()
    with pytest.raises(ValueError, match="not one of"):
        metrics.refused("a reason made of input")
    metrics.refused("aggregate_rejected")
    assert metrics.registry.get_sample_value(COUNTER, {"reason": "aggregate_rejected"}) == 1
