"""Drive one whole cohort through the protocol in one process, with no transport.

For tests, the benchmark and the in-process simulator: the same state machines the gRPC
services drive, with dropouts injected before each phase, time split between site and
server code, and every message's payload size counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetmind.aggregation.secagg.messages import ProtocolError, RoundConfig
from fleetmind.aggregation.secagg.server_completed import ServerAborted, ServerCompleted
from fleetmind.aggregation.secagg.server_r0_advertise_keys import ServerAdvertiseKeys
from fleetmind.aggregation.secagg.site_r0_advertise_keys import SiteAdvertiseKeys

PHASES = ("advertise_keys", "share_keys", "masked_input", "unmasking")


@dataclass(frozen=True)
class Dropouts:
    """Sites that vanish before sending their message of each phase."""

    before: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.before) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown phases {sorted(unknown)}; phases are {PHASES}")

    def at(self, phase: str) -> frozenset[int]:
        return frozenset(self.before.get(phase, ()))


@dataclass
class LoopbackReport:
    """What one loopback round produced, and what it cost."""

    result: ServerCompleted | ServerAborted
    site_seconds: dict[int, float]  # per site, all phases
    server_seconds: float
    site_bytes_sent: dict[int, int]  # payload each site uploaded
    server_bytes_sent: int  # payload the server sent to all sites
    server_states: list[object]  # every server state the round went through, in order
    site_refusals: dict[int, str]  # sites that refused a message and left the round


def run_round(config: RoundConfig, identities: Mapping[int, Ed25519PrivateKey],
              ring_vectors: Mapping[int, np.ndarray],
              dropouts: Dropouts = Dropouts()) -> LoopbackReport:
    site_seconds = dict.fromkeys(ring_vectors, 0.0)
    site_bytes = dict.fromkeys(ring_vectors, 0)
    server_seconds = 0.0
    server_bytes = 0

    refusals: dict[int, str] = {}

    def at_site(site: int, work: Callable[..., Any], *args: Any) -> Any:
        """Run site code; a site that refuses what it was sent leaves the round."""
        start = time.perf_counter()
        try:
            return work(*args)
        except ProtocolError as error:
            refusals[site] = str(error)
            return None
        finally:
            site_seconds[site] += time.perf_counter() - start

    def at_server(work: Callable[..., Any], *args: Any) -> Any:
        nonlocal server_seconds
        start = time.perf_counter()
        out = work(*args)
        server_seconds += time.perf_counter() - start
        return out

    def report(result: ServerCompleted | ServerAborted) -> LoopbackReport:
        return LoopbackReport(result, site_seconds, server_seconds, site_bytes, server_bytes,
                              states, refusals)

    server = ServerAdvertiseKeys(config)
    states: list[object] = [server]
    live = sorted(set(ring_vectors) - dropouts.at("advertise_keys"))
    sites = {site: at_site(site, SiteAdvertiseKeys, config, site, identities[site])
             for site in live}
    for site, state in sites.items():
        at_server(server.receive, state.advertisement)
        site_bytes[site] += state.advertisement.wire_bytes()
    server = at_server(server.close)
    states.append(server)
    if isinstance(server, ServerAborted):
        return report(server)

    live = [s for s in server.to_sites if s not in dropouts.at("share_keys")]
    server_bytes += sum(message.wire_bytes() for message in server.to_sites.values())
    sharing = {site: at_site(site, sites[site].receive, server.to_sites[site]) for site in live}
    sharing = {site: state for site, state in sharing.items() if state is not None}
    for site, state in sharing.items():
        at_server(server.receive, state.encrypted_shares)
        site_bytes[site] += state.encrypted_shares.wire_bytes()
    server = at_server(server.close)
    states.append(server)
    if isinstance(server, ServerAborted):
        return report(server)

    live = [s for s in server.to_sites if s not in dropouts.at("masked_input")]
    server_bytes += sum(message.wire_bytes() for message in server.to_sites.values())
    unmasking = {}
    for site in live:
        masking = at_site(site, sharing[site].receive, server.to_sites[site])
        if masking is None:
            continue
        masked_input, unmasking[site] = at_site(site, masking.mask, ring_vectors[site])
        at_server(server.receive, masked_input)
        site_bytes[site] += masked_input.wire_bytes(config.ring_bits)
    server = at_server(server.close)
    states.append(server)
    if isinstance(server, ServerAborted):
        return report(server)

    live = [s for s in sorted(server.request.survivors) if s not in dropouts.at("unmasking")]
    server_bytes += server.request.wire_bytes() * len(server.request.survivors)
    for site in live:
        shares = at_site(site, unmasking[site].respond, server.request)
        if shares is None:
            continue
        at_server(server.receive, shares)
        site_bytes[site] += shares.wire_bytes()
    result = at_server(server.close)
    states.append(result)
    return report(result)
