"""The endpoint's Prometheus metrics, on its own registry (several endpoints in one process,
as in the tests, keep their numbers apart), served at GET /metrics. Names follow
client/metrics.py: a `fleetmind_serve_` prefix, base units, `_total` on counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]


class ServeMetrics:
    """Every metric of one endpoint, on `self.registry`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fleetmind_serve_requests_total",
                                "Chat completion requests answered, by HTTP status",
                                ["status"], registry=r)
        self.latency = Histogram("fleetmind_serve_request_duration_seconds",
                                 "Time from a request's arrival to its last byte",
                                 registry=r)
        self.in_flight = Gauge("fleetmind_serve_requests_in_flight",
                               "Chat completion requests being answered", registry=r)
        self.prompt_tokens = Counter("fleetmind_serve_prompt_tokens_total",
                                     "Prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("fleetmind_serve_completion_tokens_total",
                                         "Tokens generated for answered requests", registry=r)
        self.version = Gauge("fleetmind_serve_active_version",
                             "The site version new requests get (-1: the base model)",
                             registry=r)
        self.version.set(-1)
        self.adapter_loads = Counter("fleetmind_serve_adapter_loads_total",
                                     "Adapters loaded (a new version served)", registry=r)
        self.adapter_unloads = Counter("fleetmind_serve_adapter_unloads_total",
                                       "Superseded adapters unloaded", registry=r)
        self.captured = Counter("fleetmind_serve_sessions_captured_total",
                                "Conversations handed to the session store, by outcome "
                                "(new, continued, duplicate, opted_out, disabled, "
                                "invalid, failed)", ["outcome"], registry=r)
        self.without_user = Counter("fleetmind_serve_sessions_without_user_total",
                                    "Sessions stored with no end-user id (each is its own "
                                    "user to user-level DP)", registry=r)
        self.capture_queue = Gauge("fleetmind_serve_capture_queue_length",
                                   "Conversations waiting to be stored", registry=r)
        self.expired = Counter("fleetmind_serve_sessions_expired_total",
                               "Sessions deleted by the retention TTL", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
