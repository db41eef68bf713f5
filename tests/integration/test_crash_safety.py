"""Crash safety (issue 5): state survives kill -9, and nothing is sent twice.

- A site that dies after its upload was acknowledged, before its store recorded the
  consolidation, settles the round from its outbox on the next run and sends nothing again.
- An outbox record of a round the aggregator never ran leaves its sessions free.
- The aggregator, a real `fleetmind server run` process, is SIGKILLed mid-round: on restart
  it serves the same versions, ledger and enrolments, reports the round abandoned, and the
  same sites complete a fresh round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import at_once, run_once_each, stocked
from support.server_process import end, start_server, write_server_config
from support.toy_fleet import FAST, toy_server_config

import fleetmind.client.site as site_module
from fleetmind.aggregation.records import OutboxRecord, verify_ledger
from fleetmind.client.agent import RoundResult, SiteUpdate, enroll, participate
from fleetmind.client.identity import load_identity_key
from fleetmind.client.outbox import Outbox
from fleetmind.client.recovery import settle_outbox
from fleetmind.client.site import Outcome, run_once
from fleetmind.client.site_config import SiteConfig
from fleetmind.client.store import SessionStore
from fleetmind.protos.fleetmind.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
from fleetmind.server.service import serve
from fleetmind.server.versions import AdapterSpec, TargetModule
from fleetmind.sim.world import WorldSpec, make_world


class Crash(BaseException):
    """Stands for kill -9: nothing after the raise runs, and no handler swallows it."""


@pytest.fixture
def aggregator_config(tmp_path: Path) -> ServerConfig:
    """The config the shared `aggregator` fixture serves."""
    return toy_server_config(tmp_path / "aggregator")


def site_config(tmp_path: Path, site: str, model: Path, address: str, key: bytes
                ) -> SiteConfig:
    return SiteConfig(name=site, data_dir=tmp_path / site, model_dir=model,
                      aggregator=address, identity_key=tmp_path / site / "identity.pem",
                      aggregator_key=key, min_new_sessions=4, distill=FAST, insecure=True,
                      round_timeout_s=60.0)


def test_a_site_killed_before_recording_sends_nothing_twice(aggregator, tmp_path,
                                                            toy_model_dir, monkeypatch) -> None:
    world = make_world(WorldSpec(seed=0, sites=3))
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    configs = [site_config(tmp_path, f"site-{i}", toy_model_dir, aggregator.address, key)
               for i in range(3)]
    stocked(configs, world.sites)
    sent: list[str] = []

    def dies_after_upload(channel, identity, name, update, outbox, **kwargs) -> RoundResult:
        sent.append(name)
        done = participate(channel, identity, name, update, outbox, **kwargs)
        if name == "site-0":  # acknowledged and published, but the store never hears of it
            raise Crash(name)
        return done

    monkeypatch.setattr(site_module, "participate", dies_after_upload)
    outcomes = run_once_each(aggregator.address, configs)  # Crash included: below
    assert isinstance(outcomes[0], Crash), outcomes[0]
    assert all(isinstance(outcomes[i], Outcome) for i in (1, 2)), outcomes
    with SessionStore(configs[0].data_dir) as store:
        unrecorded = {s.id for s in store.unconsumed()}
    identity = load_identity_key(configs[0].identity_key, create=False)
    with Outbox(configs[0].data_dir / "outbox.sqlite", identity) as outbox:
        (entry,) = list(outbox)
    assert set(entry.record.session_ids) == unrecorded  # the gap: sent, not recorded

    # The restart: round 1 published version 1 naming round 1, so its sessions are spent.
    sent.clear()
    with grpc.insecure_channel(aggregator.address) as channel:
        again = run_once(configs[0], channel)
    assert sent == []
    assert again == Outcome(activated=(1,), pending=0)
    with SessionStore(configs[0].data_dir) as store:
        assert store.unconsumed() == []
        recovered = f"round-{entry.record.round_id}-{entry.record.payload_sha256[:16]}"
        assert set(store.sessions_used_by(recovered)) == unrecorded
    with Outbox(configs[0].data_dir / "outbox.sqlite", identity) as outbox:
        assert len(list(outbox)) == 1  # nothing new was recorded, so nothing was sent


def test_a_record_of_a_round_that_never_ran_leaves_its_sessions_free(aggregator, tmp_path,
                                                                     toy_model_dir) -> None:
    key = aggregator.coordinator.registry.public_key.public_bytes_raw()
    config = site_config(tmp_path, "lone", toy_model_dir, aggregator.address, key)
    config.data_dir.mkdir()
    identity = load_identity_key(config.identity_key)
    with SessionStore(config.data_dir) as store:
        for n in range(2):
            store.add({"id": f"s{n}", "messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": f"yo {n}"}]})
    with Outbox(config.data_dir / "outbox.sqlite", identity) as outbox:
        outbox.append(OutboxRecord(round_id=42, payload_sha256="0" * 64, norm_before_clip=1,
                                   norm_after_clip=1, noise_mode="none", noise_multiplier=0,
                                   session_ids=("s0", "s1"), scrubbed={}, base_version=0))
    with grpc.insecure_channel(aggregator.address) as channel, \
            SessionStore(config.data_dir) as store:
        held = settle_outbox(config, channel, identity, key, store)
        assert held == set()
        assert [s.id for s in store.unconsumed()] == ["s0", "s1"]  # usable again


# ---- the aggregator process, killed mid-round ---------------------------------------------

SMALL = (TargetModule("model.layers.0.mlp.gate_proj", 8, 12),
         TargetModule("model.layers.0.mlp.down_proj", 12, 8))
SHAPES = {m.name: (m.out_features, 2) for m in SMALL}


class AdvertiseWatch(grpc.UnaryUnaryClientInterceptor):
    """Sets `advertised` once `want` AdvertiseKeys calls were acknowledged."""

    def __init__(self, want: int) -> None:
        self.want, self.count, self.lock = want, 0, threading.Lock()
        self.advertised = threading.Event()

    def intercept_unary_unary(self, continuation, client_call_details, request):
        reply = continuation(client_call_details, request)
        if client_call_details.method.endswith("/AdvertiseKeys") and reply.exception() is None:
            with self.lock:
                self.count += 1
                if self.count >= self.want:
                    self.advertised.set()
        return reply


def run_round(address: str, keys: list[Ed25519PrivateKey], base: int, outboxes: list[Outbox],
              interceptor: grpc.UnaryUnaryClientInterceptor | None = None
              ) -> list[RoundResult | BaseException | None]:
    """`participate` for every site at once (None: a site still in it after 30 s)."""
    rng = np.random.default_rng(base)

    def one(i: int) -> RoundResult:
        channel = grpc.insecure_channel(address)
        if interceptor is not None:
            channel = grpc.intercept_channel(channel, interceptor)
        update = SiteUpdate(
        clip_norm=1.0, privacy_unit="session",
        delta={n: rng.uniform(-0.15, 0.15, s).astype(np.float32)
               for n, s in SHAPES.items()}, base_version=base,
                            session_ids=(f"s{i}-{base}",))
        return participate(channel, keys[i], f"site-{i}", update, outboxes[i],
                           add_noise=False, timeout=5)  # an error: the kill's effect

    return at_once(len(keys), one, join_s=30)


def ledger_of(address: str) -> list[audit_pb2.LedgerEntry]:
    with grpc.insecure_channel(address) as channel:
        return list(audit_pb2_grpc.AuditStub(channel).StreamLedger(
            audit_pb2.StreamLedgerRequest(from_index=0, follow=False), timeout=5))


def test_the_aggregator_killed_mid_round_restarts_intact(tmp_path: Path) -> None:
    config = write_server_config(tmp_path / "aggregator.json", tmp_path / "data", SMALL,
                                 deadline_s=10, phase_deadline_s=5)
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    outboxes = [Outbox(tmp_path / f"site-{i}" / "outbox.sqlite", k) for i, k in enumerate(keys)]
    process, address = start_server(config)
    try:
        # Round 1 publishes, so there is a ledger entry and a version to survive the kill.
        first = run_round(address, keys, 0, outboxes)
        assert all(isinstance(r, RoundResult) and r.version == 1 for r in first), first
        with grpc.insecure_channel(address) as channel:
            sites = [enroll(channel, k, f"site-{i}").site for i, k in enumerate(keys)]
        ledger = ledger_of(address)
        assert len(ledger) == 1

        # Round 2: SIGKILL once every site's keys were acknowledged, long before publish.
        watch = AdvertiseWatch(3)
        killer = threading.Thread(target=lambda: watch.advertised.wait(20) and
                                  process.send_signal(signal.SIGKILL))
        killer.start()
        second = run_round(address, keys, 1, outboxes, watch)
        killer.join()
        assert watch.advertised.is_set() and process.wait(10) == -signal.SIGKILL
        assert not any(isinstance(r, RoundResult) for r in second), second
        assert all(len(o.for_round(2)) == 0 for o in outboxes)  # killed before any upload

        process, address = start_server(config)
        with grpc.insecure_channel(address) as channel:
            latest = models_pb2_grpc.ModelsStub(channel).Latest(models_pb2.LatestRequest(),
                                                                timeout=5)
            assert latest.version == 1
            assert [enroll(channel, k, f"site-{i}").site for i, k in enumerate(keys)] == sites
            restarted = ledger_of(address)  # round 1's entry, then round 2's abandonment
            assert restarted[:1] == ledger and len(restarted) == 2
            verify_ledger(restarted, enroll(channel, keys[0], "site-0").aggregator_key)
            # Re-attaching to round 2 hears it was abandoned, and may run again.
            events = fleet_pb2_grpc.FleetStub(channel).JoinRound(fleet_pb2.JoinRoundRequest(
                site=sites[0], round_id=2, base_version=1), timeout=5)
            aborted = next(e for e in events if e.WhichOneof("event") != "waiting")
            assert aborted.WhichOneof("event") == "aborted" and aborted.aborted.retry
            assert "restarted" in aborted.aborted.reason
            events.cancel()

        # The same sites run a fresh round on the restarted aggregator.
        third = run_round(address, keys, 1, outboxes)
        assert all(isinstance(r, RoundResult) for r in third), third
        assert {(r.version, r.cohort_size) for r in third if isinstance(r, RoundResult)} \
            == {(2, 3)}
        assert {r.round_id for r in third if isinstance(r, RoundResult)} == {3}
        after = ledger_of(address)
        assert after[:2] == restarted and len(after) == 3
    finally:
        end(process, *outboxes)



# ---- a site process, killed mid-upload ----------------------------------------------------

UPLOADER = """
import sys, time
from pathlib import Path
import grpc, numpy as np
from fleetmind.client.agent import SiteUpdate, participate
from fleetmind.client.outbox import Outbox
from fleetmind.client.identity import load_identity_key

class Stall(grpc.StreamUnaryClientInterceptor):
    # Sends the first chunk of the masked vector, says so, then hangs: the kill lands here.
    def intercept_stream_unary(self, continuation, details, chunks):
        def stalled():
            for n, chunk in enumerate(chunks):
                if n == 1:
                    print("UPLOADING", flush=True)
                    time.sleep(600)
                yield chunk
        return continuation(details, stalled())

address, folder, shapes = sys.argv[1], Path(sys.argv[2]), eval(sys.argv[3])
key = load_identity_key(folder / "identity.pem", create=False)
channel = grpc.intercept_channel(grpc.insecure_channel(address), Stall())
update = SiteUpdate(delta={n: np.full(s, 0.01, np.float32) for n, s in shapes.items()},
                    session_ids=("k0", "k1"), clip_norm=1.0,
                    privacy_unit="session")
participate(channel, key, "killed", update, Outbox(folder / "outbox.sqlite", key),
            add_noise=False, chunk_bytes=64, timeout=30)
"""


@pytest.fixture
def small_aggregator(tmp_path: Path) -> Iterator:
    spec = AdapterSpec("toy", "cd" * 32, SMALL, frozen_a_seed=7, rank=2)
    running = serve(ServerConfig(
        data_dir=tmp_path / "aggregator", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=4, deadline_s=10, phase_deadline_s=2),
        privacy=PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=10.0,
                              fixed_point_clip=1.0), adapter=spec))
    yield running
    running.stop(grace=None)


def test_a_site_killed_mid_upload_is_dropped_and_keeps_its_sessions(small_aggregator, tmp_path,
                                                                    toy_model_dir) -> None:
    address = small_aggregator.address
    key = small_aggregator.coordinator.registry.public_key.public_bytes_raw()
    config = site_config(tmp_path, "killed", toy_model_dir, address, key)
    config.data_dir.mkdir()
    identity = load_identity_key(config.identity_key)
    with SessionStore(config.data_dir) as store:
        for n in range(2):
            store.add({"id": f"k{n}", "messages": [{"role": "user", "content": f"q {n}"},
                                                   {"role": "assistant", "content": "a"}]})
    process = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, address, str(config.data_dir), repr(SHAPES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # Three more sites: with the killed one dropped, the sum still meets min_size.
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    outboxes = [Outbox(tmp_path / f"site-{i}" / "outbox.sqlite", k) for i, k in enumerate(keys)]
    try:
        killer = threading.Thread(target=lambda: process.stdout is not None and
                                  process.stdout.readline() == "UPLOADING\n" and
                                  process.send_signal(signal.SIGKILL))
        killer.start()
        done = run_round(address, keys, 0, outboxes)
        killer.join(30)
        assert process.wait(10) == -signal.SIGKILL, process.stderr.read() \
            if process.stderr else ""
        # The round completes without the killed site; both acknowledged uploads are in it.
        assert all(isinstance(r, RoundResult) for r in done), done
        with grpc.insecure_channel(address) as channel:
            killed = enroll(channel, identity, "killed").site
        assert {(r.version, r.cohort_size, r.dropped) for r in done
                if isinstance(r, RoundResult)} == {(1, 3, (killed,))}
        for outbox, result in zip(outboxes, done, strict=True):
            assert isinstance(result, RoundResult)
            (entry,) = outbox.for_round(result.round_id)
            assert entry.record.payload_sha256 == result.payload_sha256
        (record,) = ledger_of(address)
        assert json.loads(record.body)["cohort_size"] == 3

        # The killed site recorded its upload first; on restart it learns the sum left it
        # out, so its sessions stay free for the next round rather than being lost.
        with Outbox(config.data_dir / "outbox.sqlite", identity) as outbox:
            (entry,) = list(outbox)
        assert entry.record.session_ids == ("k0", "k1")
        with grpc.insecure_channel(address) as channel, \
                SessionStore(config.data_dir) as store:
            assert settle_outbox(config, channel, identity, key, store) == set()
            assert [s.id for s in store.unconsumed()] == ["k0", "k1"]
    finally:
        end(process, *outboxes)
