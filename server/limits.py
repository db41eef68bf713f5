"""The aggregator's limits against load and hostile peers: how many calls it serves at once,
how long a stream may stay open, how much upload it buffers, what an unmasked aggregate may
look like before it is signed. Frozen and validated at construction; `serve` takes one
(`ServerLimits()` by default). docs/hardening.md gives the threat model behind each.

In the TOML config these belong under `[limits]`, one key per field, same names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fleetmind.aggregation.aggregate_check import (
    MAX_UNITS_PER_SITE,
    MIN_SITE_WEIGHT,
    NOISE_NORM_MULTIPLE,
)

INT63_MAX = (1 << 63) - 1  # largest id any field may carry: SQLite and struct('<q') stop here


@dataclass(frozen=True)
class ServerLimits:
    """max_streams: long-lived calls open at once (JoinRound, Watch, StreamLedger, Get, the
    health Watch, reflection); None takes ServerConfig.max_workers. max_calls: short calls
    and uploads at once. reserved_workers: threads beyond both caps, so Health.Check and the
    refusals themselves always find one. Per peer (the certificate's name under mTLS; on
    plaintext loopback every caller is one peer, so only the global caps apply):
    max_streams_per_peer, max_calls_per_peer. Excess is RESOURCE_EXHAUSTED, never queued.

    stream_max_s: a Watch, StreamLedger(follow) or queued JoinRound ends after this long
    (the caller re-opens it). upload_idle_s: an upload that sends no chunk for this long is
    cancelled; so is one whose round left the upload phase. max_upload_bytes_in_flight:
    bytes announced by uploads still being received, all sites together. min_chunk_bytes:
    every upload chunk but the last carries at least this much.

    keepalive_*, max_connection_*: HTTP/2 connection settings (grpc channel arguments):
    pings find dead peers, and a connection older than max_connection_age_s is asked to go
    away, after a grace longer than stream_max_s so no stream is cut.

    max_details_chars: error details are cut to this length (they may quote the input).

    Aggregate checks before a version is signed: max_units_per_site bounds a site's
    contributing_units at join; min_site_weight is the least staleness weight a site may
    use (1/sqrt(1 + 9999): a delta 9999 versions stale), so the cohort's weight sum lies in
    [contributors x min_site_weight, contributors x 1]; noise_norm_multiple is k in the
    mean-delta bound (aggregation.aggregate_check.AggregateBounds.mean_delta_bound)."""

    max_streams: int | None = None
    max_calls: int = 64
    reserved_workers: int = 8
    max_streams_per_peer: int = 16
    max_calls_per_peer: int = 8
    stream_max_s: float = 600.0
    upload_idle_s: float = 30.0
    max_upload_bytes_in_flight: int = 256 << 20
    min_chunk_bytes: int = 64
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 10.0
    max_connection_idle_s: float = 900.0
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 900.0
    max_details_chars: int = 200
    max_units_per_site: int = MAX_UNITS_PER_SITE
    min_site_weight: float = MIN_SITE_WEIGHT
    noise_norm_multiple: float = NOISE_NORM_MULTIPLE

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_streams":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"limits.{f.name}={value!r} must be a finite number > 0")
            if f.type in ("int", "int | None") and not isinstance(value, int):
                raise ValueError(f"limits.{f.name}={value!r} must be an integer")
        if self.min_site_weight > 1:
            raise ValueError(f"limits.min_site_weight={self.min_site_weight} must be <= 1 "
                             "(the largest staleness weight)")
        if self.max_connection_age_grace_s <= self.stream_max_s:
            raise ValueError(f"limits.max_connection_age_grace_s="
                             f"{self.max_connection_age_grace_s} must exceed stream_max_s="
                             f"{self.stream_max_s}, or connection ageing cuts live streams")
        if self.max_details_chars < 40:
            raise ValueError(f"limits.max_details_chars={self.max_details_chars} must be >= "
                             "40, or errors say nothing")

    def streams(self, max_workers: int) -> int:
        """The stream cap, with ServerConfig.max_workers standing in when unset."""
        return self.max_streams if self.max_streams is not None else max_workers

    def workers(self, max_workers: int) -> int:
        """Threads the server needs so that nothing admitted ever queues."""
        return self.streams(max_workers) + self.max_calls + self.reserved_workers

    def channel_options(self) -> list[tuple[str, int]]:
        ms = 1000
        return [("grpc.keepalive_time_ms", int(self.keepalive_time_s * ms)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * ms)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms",
                 int(self.min_ping_interval_s * ms)),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * ms)),
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * ms)),
                ("grpc.max_connection_age_grace_ms",
                 int(self.max_connection_age_grace_s * ms))]
