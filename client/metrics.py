"""A site's Prometheus metrics, served over HTTP at `metrics_listen` (SiteConfig).

The agent loop (client/site.py) tells a `SiteMetrics` what it did; nothing else reads it.
Each instance owns its own CollectorRegistry (not prometheus_client's global one), so
several sites in one process (tests, the simulated fleet) keep their numbers apart. Names
follow Prometheus conventions: a `fleetmind_site_` prefix, base units in the name,
`_total` on counters; which site a series belongs to is the scrape target's label.

The HTTP helper repeats server/metrics.py's on purpose: the client never imports the
server (tests/test_boundaries.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class SiteMetrics:
    """Every metric of one site agent, on `self.registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_stored = Gauge("fleetmind_site_sessions_stored",
                                     "Sessions in the site's store", registry=r)
        self.sessions_unconsumed = Gauge("fleetmind_site_sessions_unconsumed",
                                         "Stored sessions no completed round has used yet",
                                         registry=r)
        self.consolidations = Counter("fleetmind_site_consolidations_total",
                                      "Consolidations (OPSD runs) finished", registry=r)
        self.tokens = Counter("fleetmind_site_distilled_tokens_total",
                              "Tokens distilled on (student samples scored against the "
                              "teacher)", registry=r)
        self.rounds = Counter("fleetmind_site_rounds_total",
                              "Rounds this site's update was published in", registry=r)
        self.failures = Counter("fleetmind_site_failures_total",
                                "Iterations that failed and were retried (aggregator away "
                                "or refusing, round aborted, stale base)", registry=r)
        self.version = Gauge("fleetmind_site_active_version",
                             "Number of the active global version (-1: none yet)", registry=r)
        self.version.set(-1)
        self.last_activation = Gauge("fleetmind_site_last_activation_timestamp_seconds",
                                     "Unix time the active version was activated (0: never)",
                                     registry=r)
        self.endpoint: MetricsEndpoint | None = None  # set by serve()

    def sessions(self, stored: int, unconsumed: int) -> None:
        self.sessions_stored.set(stored)
        self.sessions_unconsumed.set(unconsumed)

    def consolidated(self, tokens: int) -> None:
        self.consolidations.inc()
        self.tokens.inc(tokens)

    def active(self, version: int | None, activated_at: float | None) -> None:
        """The active version, and when it became active (None: unknown, left as is)."""
        self.version.set(-1 if version is None else version)
        if activated_at is not None:
            self.last_activation.set(activated_at)

    def serve(self, listen: str) -> MetricsEndpoint:
        """Serves /metrics on `listen` ("host:port"; port 0: the OS picks one)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            server, thread = start_http_server(int(port), addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {listen}: {error.strerror or error}; pick "
                          "another metrics_listen port (0: any free one)") from None
        self.endpoint = MetricsEndpoint(server, thread, host, server.server_port)
        return self.endpoint


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; `stop()` closes its socket."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
