"""The aggregator's Prometheus metrics, served over HTTP at `metrics_listen` (ServerConfig).

`ServerMetrics` is the coordinator's `RoundListener` (rounds, cohorts, dropouts, phase
latencies, ε, version) and is told by the gRPC services about bytes and watchers, so the
protocol code stays free of metrics (STYLE.md: metrics go to a listener). Each instance
owns its own CollectorRegistry rather than prometheus_client's global one: several
aggregators in one process (tests, the simulated fleet) must not collide.

Names follow Prometheus conventions: a `fleetmind_aggregator_` prefix, base units in the
name (`_seconds`, `_bytes`), `_total` on counters. deploy/grafana/fleetmind.json queries
them; tests/unit/test_deploy_kit.py checks that every name it uses exists here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetmind.runtime.metrics_endpoint import MetricsEndpoint, serve_registry
from fleetmind.server.coordinator import RoundListener

PHASES = ("advertise_keys", "share_keys", "masked_input_collection", "unmasking")
OUTCOMES = ("published", "aborted", "abandoned", "refused")
# Cohorts run from the minimum of 3 sites to thousands (docs/design.md "Scale"); the 2
# bucket stays so dashboards built on it keep their series.
COHORT_BUCKETS = (2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# A phase closes in milliseconds on loopback and at its deadline (default 60 s) with dropouts.
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ROUND_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Why something was refused: a fixed set, so no input can grow the label space. The status
# a call got is implied (docs/hardening.md, "Refusals"): capacity, per_peer, upload_bytes,
# too_large, budget and resource_exhausted are RESOURCE_EXHAUSTED; quarantined is
# PERMISSION_DENIED; upload_idle and upload_past_phase are uploads cancelled; queue_expired
# is a JoinRound queued past stream_max_s; aggregate_rejected is an unmasked sum the
# aggregate checks refused; the rest are named after their status.
REFUSAL_REASONS = ("capacity", "per_peer", "upload_bytes", "too_large", "budget",
                   "resource_exhausted", "invalid_argument", "unauthenticated",
                   "permission_denied", "quarantined", "failed_precondition",
                   "already_exists", "not_found", "out_of_range", "upload_idle",
                   "upload_past_phase", "queue_expired", "aggregate_rejected")


class ServerMetrics(RoundListener):
    """Every metric of one aggregator, on `self.registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter("fleetmind_aggregator_rounds_total",
                              "Rounds ended, by outcome: published a version, aborted "
                              "(too few sites or a failed merge), abandoned at a restart, "
                              "refused (the privacy budget could not pay)",
                              ["outcome"], registry=r)
        self.cohort = Histogram("fleetmind_aggregator_cohort_sites",
                                "Sites in each cohort when its round started",
                                buckets=COHORT_BUCKETS, registry=r)
        self.contributors = Histogram("fleetmind_aggregator_contributors_sites",
                                      "Sites whose vectors the published sum holds",
                                      buckets=COHORT_BUCKETS, registry=r)
        self.dropouts = Counter("fleetmind_aggregator_dropouts_total",
                                "Sites that missed a secure-aggregation phase's deadline",
                                ["phase"], registry=r)
        self.phase_seconds = Histogram("fleetmind_aggregator_phase_duration_seconds",
                                       "From a phase's start to its close",
                                       ["phase"], buckets=PHASE_BUCKETS, registry=r)
        self.round_seconds = Histogram("fleetmind_aggregator_round_duration_seconds",
                                       "From a cohort's start to the round's end",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.received = Counter("fleetmind_aggregator_received_bytes_total",
                                "Bytes of site messages received, by gRPC method",
                                ["method"], registry=r)
        self.sent = Counter("fleetmind_aggregator_sent_bytes_total",
                            "Bytes of messages sent to sites, by gRPC method",
                            ["method"], registry=r)
        self.epsilon_spent = Gauge("fleetmind_aggregator_epsilon_spent",
                                   "Privacy loss epsilon spent so far, at delta "
                                   "(fleetmind_aggregator_delta)", registry=r)
        self.epsilon_budget = Gauge("fleetmind_aggregator_epsilon_budget",
                                    "The configured privacy budget epsilon", registry=r)
        self.delta = Gauge("fleetmind_aggregator_delta",
                           "The delta at which epsilon is accounted", registry=r)
        self.version = Gauge("fleetmind_aggregator_latest_version",
                             "Number of the latest published global version", registry=r)
        self.watchers = Gauge("fleetmind_aggregator_watchers",
                              "Open Models.Watch streams (sites waiting for versions)",
                              registry=r)
        self.round_in_flight = Gauge("fleetmind_aggregator_round_in_flight",
                                     "1 while a round runs, else 0", registry=r)
        self.refusals = Counter("fleetmind_aggregator_refusals_total",
                                "Calls refused or cancelled, and aggregates rejected, by "
                                "reason (docs/hardening.md)", ["reason"], registry=r)
        # Known label values start at zero, so rate() and dashboards see every series
        # from the first scrape, not only after the first event of each kind.
        for outcome in OUTCOMES:
            self.rounds.labels(outcome)
        for phase in PHASES:
            self.dropouts.labels(phase)
            self.phase_seconds.labels(phase)
        for method in ("AdvertiseKeys", "ShareKeys", "SubmitMaskedVector", "Unmask"):
            self.received.labels(method)
        for method in ("JoinRound", "Get", "Watch"):
            self.sent.labels(method)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)

    # ---- RoundListener --------------------------------------------------------------

    def round_started(self, round_id: int, cohort_size: int) -> None:
        self.cohort.observe(cohort_size)
        self.round_in_flight.set(1)

    def phase_closed(self, round_id: int, phase: str, seconds: float, dropped: int) -> None:
        self.phase_seconds.labels(phase).observe(seconds)
        if dropped:
            self.dropouts.labels(phase).inc(dropped)

    def round_ended(self, round_id: int, outcome: str, seconds: float | None,
                    contributors: int = 0) -> None:
        self.rounds.labels(outcome).inc()
        if seconds is not None:  # an abandoned or refused round never ran here
            self.round_seconds.observe(seconds)
            self.round_in_flight.set(0)
        if contributors:
            self.contributors.observe(contributors)

    def state(self, version: int, epsilon_spent: float, epsilon_budget: float,
              delta: float) -> None:
        self.version.set(version)
        self.epsilon_spent.set(epsilon_spent)
        self.epsilon_budget.set(epsilon_budget)
        self.delta.set(delta)

    def refused(self, reason: str) -> None:
        """One refusal; `reason` must be one of REFUSAL_REASONS (the label set is fixed)."""
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"refusal reason {reason!r} is not one of {REFUSAL_REASONS}")
        self.refusals.labels(reason).inc()

    # ---- HTTP -------------------------------------------------------------------------

    def serve(self, listen: str) -> MetricsEndpoint:
        """Serves /metrics on `listen` ("host:port"; port 0: the OS picks one)."""
        return serve_registry(self.registry, listen)
