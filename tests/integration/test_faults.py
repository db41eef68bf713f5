"""Faults (issue 18, item 8): the aggregator SIGKILLed at every phase of a round.

A real `fleetmind server run` process on 127.0.0.1:0 with a data dir; three light sites
(tests/support/secagg_rounds.py `Site`: enrol, join, advertise, share, upload, unmask, a step
at a time from the test thread) publish round 1, then run round 2 up to a phase; the
aggregator is killed with SIGKILL there and restarted on the same data dir. After the
restart: the ledger verifies (`fleetmind audit ledger`, exit 0), every published version
verifies (`fleetmind audit version`, exit 0), what was published before the kill is still
there, the interrupted round is abandoned in coordinator.json with the phase it died in (a
site re-attaching hears `aborted`, retry), and the same sites publish the next version.
Killed right after publication, the published round is kept (not abandoned) instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.secagg_rounds import Site, expected_b, quantisation_bound, run_phases
from support.server_process import start_server, write_server_config

from fleetmind.aggregation.records import LedgerEntry as StoredEntry
from fleetmind.aggregation.records import StoppedRound, parse_ledger_body, verify_ledger
from fleetmind.protos.fleetmind.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from fleetmind.server import versions
from fleetmind.sim.bench.wire import MODULES


class Light(Site):
    """`Site` joining on a given base version (the latest one, as real sites do)."""

    base = 0

    def join(self, round_id: int | None = None) -> None:
        request = fleet_pb2.JoinRoundRequest(site=self.id, base_version=self.base,
                                             contributing_units=1)
        if round_id is not None:
            request.round_id = round_id
        self.stream = self.fleet.JoinRound(request, timeout=30)


@dataclass
class Aggregator:
    process: subprocess.Popen
    address: str
    channel: grpc.Channel


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[[], Aggregator]]:
    """Starts `fleetmind server run` on the same config and data dir; stops them all."""
    config = write_server_config(tmp_path / "aggregator.json", tmp_path / "data", MODULES,
                                 deadline_s=30, phase_deadline_s=30)
    started: list[Aggregator] = []

    def start() -> Aggregator:
        log = open(tmp_path / f"aggregator-{len(started)}.log", "w")  # noqa: SIM115
        process, address = start_server(config, stderr=log)
        log.close()
        running = Aggregator(process, address, grpc.insecure_channel(address))
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.channel.close()
            if running.process.poll() is None:
                running.process.kill()
            running.process.wait(10)
            if running.process.stdout is not None:
                running.process.stdout.close()


def kill(running: Aggregator) -> None:
    os.kill(running.process.pid, signal.SIGKILL)
    assert running.process.wait(10) == -signal.SIGKILL


def ledger(channel: grpc.Channel) -> list[StoredEntry]:
    entries = audit_pb2_grpc.AuditStub(channel).StreamLedger(
        audit_pb2.StreamLedgerRequest(from_index=0, follow=False), timeout=5)
    return [StoredEntry(e.index, e.prev_hash, e.body, e.hash, e.signature) for e in entries]


def full_round(sites: list[Light], base: int) -> set[tuple[int, int]]:
    for s in sites:
        s.base = base
        s.join()
    for step in (Light.advertise, Light.share):
        for s in sites:
            step(s)
    uploads = [s.masked_chunks() for s in sites]
    for s, chunks in zip(sites, uploads, strict=True):
        s.submit(chunks)
    for s in sites:
        s.unmask()
    return {(d.version, d.cohort_size) for d in
            (s.expect("completed").completed for s in sites)}


def to_cohort(sites: list[Light]) -> None:
    for s in sites:  # the cohort formed: every site heard the round's config
        s.wire_config = s.expect("config").config


def to_advertise(sites: list[Light]) -> None:
    for s in sites[:2]:
        s.advertise()  # acknowledged; the third never advertises


def to_share(sites: list[Light]) -> None:
    for s in sites:
        s.advertise()
    for s in sites[:2]:
        s.share()


def to_masked(sites: list[Light]) -> None:
    run_phases(sites, first="advertise", last="share")
    uploads = [s.masked_chunks() for s in sites]
    for s, chunks in zip(sites[:2], uploads[:2], strict=True):
        receipt = s.submit(chunks)  # acknowledged: the aggregator holds this upload
        assert receipt.payload_sha256 == chunks[0].payload_sha256


def to_unmasking(sites: list[Light]) -> None:
    run_phases(sites, first="advertise", last="upload")
    for s in sites[:2]:
        s.unmask()


def to_published(sites: list[Light]) -> None:
    to_unmasking(sites)
    sites[2].unmask()
    done = {(d.version, d.cohort_size) for d in
            (s.expect("completed").completed for s in sites)}
    assert done == {(2, 3)}  # published and announced; no site has downloaded it


# step to reach, phase recorded for the abandoned round (None: it published)
PHASES = {
    "cohort_formed": (to_cohort, "advertise_keys"),
    "advertise_keys": (to_advertise, "advertise_keys"),
    "share_keys": (to_share, "share_keys"),
    "masked_input_collection": (to_masked, "masked_input_collection"),
    "unmasking": (to_unmasking, "unmasking"),
    "published": (to_published, None),
}


def audit(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fleetmind.cli.main", "audit", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (args, done.stdout, done.stderr)


@pytest.mark.parametrize("phase", list(PHASES))
def test_the_aggregator_killed_in_a_phase_restarts_intact(phase: str, launch,
                                                          tmp_path: Path) -> None:
    reach, recorded = PHASES[phase]
    data = tmp_path / "data"
    first = launch()
    sites = [Light(first.channel, f"site-{i}", seed=i) for i in range(3)]
    key_file = tmp_path / "aggregator.key"
    key_file.write_bytes(sites[0].aggregator_key)

    # Round 1 publishes version 1: acknowledged and released before the kill.
    assert full_round(sites, base=0) == {(1, 3)}
    before = ledger(first.channel)
    assert len(before) == 1

    # Round 2, up to `phase`, then kill -9.
    for s in sites:
        s.base = 1
        s.join()
    reach(sites)
    interrupted = 2
    kill(first)

    second = launch()
    for s in sites:
        s.fleet = fleet_pb2_grpc.FleetStub(second.channel)
    # The ledger and every published version verify, as an auditor runs them.
    audit("ledger", "--file", str(data / "ledger.sqlite"), "--aggregator-key", str(key_file))
    after = ledger(second.channel)
    verify_ledger(after, sites[0].aggregator_key)
    published = 1 if recorded is not None else 2
    assert after[:1] == before and len(after) == 2  # nothing released is lost
    if recorded is not None:  # the abandoned round's own entry: it spent nothing
        stopped = parse_ledger_body(after[1].body)
        assert isinstance(stopped, StoppedRound)
        assert (stopped.round_id, stopped.outcome, stopped.phase, stopped.drop_reason,
                stopped.epsilon_round, stopped.version) == (
            interrupted, "abandoned", recorded, "abandoned_at_restart", 0.0, 1)
    folders = sorted((data / "versions").iterdir())
    assert [int(f.name) for f in folders] == list(range(published + 1))  # genesis and on
    for folder in folders[1:]:
        audit("version", str(folder), "--aggregator-key", str(key_file),
              "--ledger", str(data / "ledger.sqlite"))
    latest = models_pb2_grpc.ModelsStub(second.channel).Latest(models_pb2.LatestRequest(),
                                                               timeout=5)
    assert latest.version == published

    state = json.loads((data / "coordinator.json").read_text())
    assert state["in_flight"] is None
    abandoned = {a["round_id"]: a for a in state["abandoned"]}
    if recorded is None:
        assert interrupted not in abandoned  # published before the kill: kept, not abandoned
        assert [spent["round_id"] for spent in state["spent"]] == [1, 2]
    else:
        assert abandoned[interrupted]["phase"] == recorded, abandoned
        assert recorded in abandoned[interrupted]["reason"]
        # A site re-attaching to the lost round hears it was abandoned and may retry,
        # so an acknowledged upload is sent again, not silently dropped.
        sites[0].join(round_id=interrupted)
        aborted = sites[0].expect("aborted").aborted
        assert aborted.retry and "restarted" in aborted.reason
        assert aborted.drop_reason == fleet_pb2.DROP_REASON_ABANDONED_AT_RESTART
        assert aborted.phase == fleet_pb2.RoundPhase.Value(f"ROUND_PHASE_{recorded.upper()}")
        assert sites[0].stream is not None
        sites[0].stream.cancel()

    # The same sites publish the next version on the restarted aggregator.
    assert full_round(sites, base=published) == {(published + 1, 3)}
    final = ledger(second.channel)
    assert final[:2] == after and len(final) == 3
    verify_ledger(final, sites[0].aggregator_key)
    assert final[-1].record.round_id == 3 and final[-1].record.version == published + 1
    # Every round merged the same three deltas (FedAvg, rate 1, from a zero genesis B), so
    # the new version is (published + 1) times their mean: the re-sent updates, in full.
    newest = sorted((data / "versions").iterdir())[-1]
    _, b = versions.read_lora(newest / versions.ADAPTER_WEIGHTS)
    bound = (published + 1) * quantisation_bound(sites[0], 3)
    merged: list[Site] = list(sites)
    for name, want in expected_b(merged).items():
        assert np.abs(b[name] - (published + 1) * want).max() <= bound, name

