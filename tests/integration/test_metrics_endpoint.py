"""The runtime's metrics endpoint (runtime/metrics_endpoint.py) over real HTTP: it serves
its registry, refuses a taken port in one line, and stops."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from fleetmind.runtime import config, metrics_endpoint


def test_the_metrics_endpoint_serves_its_registry_and_stops() -> None:
    registry = CollectorRegistry()
    Counter("fleetmind_test_things_total", "things", registry=registry).inc(3)
    endpoint = metrics_endpoint.serve_registry(registry, "127.0.0.1:0")
    try:
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(endpoint.url, timeout=10) as reply:
            assert "fleetmind_test_things_total 3.0" in reply.read().decode()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{endpoint.port}"):
            metrics_endpoint.serve_registry(registry, f"127.0.0.1:{endpoint.port}")
    finally:
        endpoint.stop()
    with pytest.raises(config.ConfigError, match="metrics_listen='9464' must be host:port"):
        metrics_endpoint.serve_registry(registry, "9464")
