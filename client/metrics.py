"""A site's Prometheus metrics, served over HTTP at `metrics_listen` (SiteConfig).

The agent loop (client/site.py) tells a `SiteMetrics` what it did; nothing else reads it.
Each instance owns its own CollectorRegistry (not prometheus_client's global one), so
several sites in one process (tests, the simulated fleet) keep their numbers apart. Names
follow Prometheus conventions: a `fleetmind_site_` prefix, base units in the name,
`_total` on counters; which site a series belongs to is the scrape target's label.

The HTTP endpoint is fleetmind.runtime.metrics_endpoint's, shared with the aggregator.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleetmind.runtime.metrics_endpoint import MetricsEndpoint, serve_registry

__all__ = ["MetricsEndpoint", "SiteMetrics"]


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
        self.endpoint = serve_registry(self.registry, listen)
        return self.endpoint
