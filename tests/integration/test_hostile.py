"""Hostile inputs against a live aggregator over raw loopback gRPC (issue 18): each is
refused with its precise status, the server answers Health.Check after, and nothing it
keeps (enrolments, queue, versions, ledger, budget, coordinator.json) changed. Then the
same for a site's versions: downgrades, undone rollbacks, keyless and poisoned versions.

Groups: wire validation (garbage bytes, integers past 2^63-1, absurd units, long names,
small-order keys), capacity and liveness (stream and call caps, per-peer caps, 300 idle
streams, stream lifetimes), uploads (slot claimed at the first chunk, bytes in flight,
headers, chunk size, idle uploads), poisoned aggregates (forged weight words, inflated
deltas), and the site's activation rules.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.enrolment import enroll_request
from support.hostile import assert_healthy, inflate, snapshot, weight_word
from support.net import refused
from support.pki import aggregator_tls
from support.secagg_rounds import Site, config, run_phases, run_round

from fleetmind.aggregation.merge import secagg_payload
from fleetmind.aggregation.records import StoppedRound
from fleetmind.client import versions as site_versions
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from fleetmind.server import identity
from fleetmind.server.config import (
    CohortPolicy,
    ConfigError,
    PrivacyPolicy,
    ServerConfig,
    load_config,
)
from fleetmind.server.limits import ServerLimits
from fleetmind.server.service import RunningServer, serve
from fleetmind.server.versions import Release
from fleetmind.sim.bench.wire import SPEC

S = grpc.StatusCode
BIG = 1 << 63  # one past the largest id any field may carry
HUGE = (1 << 64) - 1


# ---- fixtures ---------------------------------------------------------------------------


Started = tuple[RunningServer, grpc.Channel]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Started]]:
    """start(limits=None): a plaintext aggregator on 127.0.0.1:0 (the cohort of
    test_server_round: three sites) and a channel to it; both closed at the end."""
    opened: list[Started] = []

    def _start(limits: ServerLimits | None = None) -> Started:
        running = serve(config(tmp_path / f"data-{len(opened)}"), limits)
        channel = grpc.insecure_channel(running.address)
        opened.append((running, channel))
        return running, channel

    yield _start
    for running, channel in opened:
        channel.close()
        running.stop(grace=None)


@pytest.fixture
def server(start) -> Started:
    return start()


def enrolled(channel: grpc.Channel, name: str = "site-a") -> int:
    return fleet_pb2_grpc.FleetStub(channel).Enroll(enroll_request(name), timeout=5).site


def wait_until(predicate: Callable[[], bool], seconds: float = 20.0) -> bool:
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---- wire validation: raw bytes, sent as they are --------------------------------------

UU, US, SU = "unary", "server-stream", "client-stream"
FLEET, MODELS, AUDIT = "/fleetmind.v1.Fleet/", "/fleetmind.v1.Models/", "/fleetmind.v1.Audit/"
GARBAGE = b"\xff\xff\xff\xff\x0f\x00garbage"  # an invalid tag, then noise


def _small_order_enrolment(hex_key: str) -> bytes:
    """An enrolment with a small-order key and the signature (R = identity, S = 0) that
    such a key 'verifies'."""
    key = bytes.fromhex(hex_key)
    identity_point = bytes.fromhex("01" + "00" * 31)
    return fleet_pb2.EnrollRequest(site_name="small", identity_key=key,
                                   proof=identity_point + bytes(32)).SerializeToString()


def _join(**fields: int) -> bytes:
    base = {"site": 1, "contributing_units": 1}
    return fleet_pb2.JoinRoundRequest(**{**base, **fields}).SerializeToString()


WIRE_CASES = [
    # garbage bytes parsed in the handler: INVALID_ARGUMENT, not INTERNAL
    ("garbage-enroll", FLEET + "Enroll", UU, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-join", FLEET + "JoinRound", US, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-advertise", FLEET + "AdvertiseKeys", UU, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-share", FLEET + "ShareKeys", UU, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-unmask", FLEET + "Unmask", UU, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-upload-chunk", FLEET + "SubmitMaskedVector", SU, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-latest", MODELS + "Latest", UU, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-get", MODELS + "Get", US, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-watch", MODELS + "Watch", US, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-ledger", AUDIT + "StreamLedger", US, GARBAGE, S.INVALID_ARGUMENT),
    ("garbage-budget", AUDIT + "Budget", UU, GARBAGE, S.INVALID_ARGUMENT),
    ("invalid-utf8-name", FLEET + "Enroll", UU, b"\x0a\x02\xc3\x28", S.INVALID_ARGUMENT),
    # integers past 2^63-1: INVALID_ARGUMENT, not UNKNOWN
    ("join-round-id-2^63", FLEET + "JoinRound", US, _join(round_id=BIG), S.INVALID_ARGUMENT),
    ("join-round-id-2^64-1", FLEET + "JoinRound", US, _join(round_id=HUGE),
     S.INVALID_ARGUMENT),
    ("join-base-version-2^63", FLEET + "JoinRound", US, _join(base_version=BIG),
     S.INVALID_ARGUMENT),
    ("advertise-round-id-2^63", FLEET + "AdvertiseKeys", UU, fleet_pb2.KeyAdvertisement(
        round_id=BIG, site=1, signature=bytes(64)).SerializeToString(), S.INVALID_ARGUMENT),
    ("shares-round-id-2^64-1", FLEET + "ShareKeys", UU, fleet_pb2.EncryptedShares(
        round_id=HUGE, sender=1).SerializeToString(), S.INVALID_ARGUMENT),
    ("unmask-round-id-2^63", FLEET + "Unmask", UU, fleet_pb2.UnmaskShares(
        round_id=BIG, site=1).SerializeToString(), S.INVALID_ARGUMENT),
    ("chunk-offset-2^63", FLEET + "SubmitMaskedVector", SU, fleet_pb2.MaskedVectorChunk(
        round_id=1, site=1, offset=BIG).SerializeToString(), S.INVALID_ARGUMENT),
    ("ledger-index-2^63", AUDIT + "StreamLedger", US, audit_pb2.StreamLedgerRequest(
        from_index=BIG).SerializeToString(), S.INVALID_ARGUMENT),
    ("ledger-index-2^64-1-follow", AUDIT + "StreamLedger", US, audit_pb2.StreamLedgerRequest(
        from_index=HUGE, follow=True).SerializeToString(), S.INVALID_ARGUMENT),
    ("get-version-2^63", MODELS + "Get", US, models_pb2.GetRequest(
        version=BIG, file="adapter_config.json").SerializeToString(), S.INVALID_ARGUMENT),
    ("get-offset-2^64-1", MODELS + "Get", US, models_pb2.GetRequest(
        version=0, file="adapter_config.json", offset=HUGE).SerializeToString(),
     S.INVALID_ARGUMENT),
    ("watch-after-2^63", MODELS + "Watch", US, models_pb2.WatchRequest(
        after_version=BIG).SerializeToString(), S.INVALID_ARGUMENT),
    # small-order Ed25519 keys prove nothing: refused at enrolment
    ("small-order-identity", FLEET + "Enroll", UU, _small_order_enrolment("01" + "00" * 31),
     S.INVALID_ARGUMENT),
    ("small-order-8", FLEET + "Enroll", UU, _small_order_enrolment(
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
     S.INVALID_ARGUMENT),
    ("small-order-non-canonical", FLEET + "Enroll", UU, _small_order_enrolment(
        "ee" + "ff" * 30 + "7f"), S.INVALID_ARGUMENT),
    ("identity-key-31-bytes", FLEET + "Enroll", UU, fleet_pb2.EnrollRequest(
        site_name="short", identity_key=bytes(31), proof=bytes(64)).SerializeToString(),
     S.INVALID_ARGUMENT),
    ("name-100k-chars", FLEET + "Enroll", UU, fleet_pb2.EnrollRequest(
        site_name="n" * 100_000, identity_key=bytes(32), proof=bytes(64)).SerializeToString(),
     S.INVALID_ARGUMENT),
    ("unknown-method", FLEET + "Nope", UU, b"", S.UNIMPLEMENTED),
]


def _raw_call(channel: grpc.Channel, method: str, kind: str, payload: bytes):
    if kind == UU:
        return lambda: channel.unary_unary(method)(payload, timeout=5)
    if kind == US:
        return lambda: channel.unary_stream(method)(payload, timeout=5)
    return lambda: channel.stream_unary(method)(iter([payload]), timeout=5)


@pytest.mark.parametrize(("method", "kind", "payload", "status"),
                         [case[1:] for case in WIRE_CASES], ids=[c[0] for c in WIRE_CASES])
def test_a_hostile_message_is_refused_and_changes_nothing(server, method, kind, payload,
                                                          status) -> None:
    running, channel = server
    enrolled(channel)  # site 1 exists, so the refusal is about the message alone
    before = snapshot(running)
    error = refused(_raw_call(channel, method, kind, payload))
    assert error.code() == status, error.details()
    assert len(error.details() or "") <= running.limits.max_details_chars
    assert_healthy(channel)
    assert snapshot(running) == before


# The fuzzer: random and bit-flipped messages on every RPC, from a fixed seed, bounded
# (11 RPCs x FUZZ_INPUTS inputs). Nobody is enrolled, so nothing may change; every answer is
# a refusal the module docstring of server/service.py names, a read that succeeds, or a
# stream that outlives the fuzzer's short deadline. Never UNKNOWN or INTERNAL.
FUZZ_SEEDS = {
    FLEET + "Enroll": (UU, enroll_request("fuzz").SerializeToString()),
    FLEET + "JoinRound": (US, _join(round_id=3, base_version=0)),
    FLEET + "AdvertiseKeys": (UU, fleet_pb2.KeyAdvertisement(
        round_id=1, site=1, mask_key=b"m" * 32, share_key=b"s" * 32,
        signature=b"g" * 64).SerializeToString()),
    FLEET + "ShareKeys": (UU, fleet_pb2.EncryptedShares(round_id=1, sender=1, shares=[
        fleet_pb2.EncryptedShare(sender=1, recipient=2, ciphertext=b"c" * 60)]
        ).SerializeToString()),
    FLEET + "Unmask": (UU, fleet_pb2.UnmaskShares(round_id=1, site=1, self_mask_shares=[
        fleet_pb2.ShamirShare(owner=2, x=1, y=b"y" * 33)]).SerializeToString()),
    FLEET + "SubmitMaskedVector": (SU, fleet_pb2.MaskedVectorChunk(
        round_id=1, site=1, ring_bits=32, total_bytes=8, payload_sha256=b"h" * 32,
        data=b"d" * 8).SerializeToString()),
    MODELS + "Latest": (UU, models_pb2.LatestRequest().SerializeToString()),
    MODELS + "Get": (US, models_pb2.GetRequest(
        version=0, file="adapter_config.json", max_chunk_bytes=64).SerializeToString()),
    MODELS + "Watch": (US, models_pb2.WatchRequest(after_version=5).SerializeToString()),
    AUDIT + "StreamLedger": (US, audit_pb2.StreamLedgerRequest().SerializeToString()),
    AUDIT + "Budget": (UU, audit_pb2.BudgetRequest().SerializeToString()),
}
FUZZ_INPUTS = 40
FUZZ_ANSWERS = {S.OK, S.INVALID_ARGUMENT, S.PERMISSION_DENIED, S.FAILED_PRECONDITION,
                S.UNAUTHENTICATED, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED, S.NOT_FOUND,
                S.OUT_OF_RANGE, S.DEADLINE_EXCEEDED}


def _fuzzed(seed: bytes, rng: np.random.Generator) -> bytes:
    """Random bytes, or the seed message with bits flipped, bytes cut or inserted."""
    choice = rng.integers(4)
    if choice == 0 or not seed:
        return rng.bytes(int(rng.integers(0, 64)))
    data = bytearray(seed)
    if choice == 1:
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    elif choice == 2:
        cut = int(rng.integers(len(data)))
        del data[cut:cut + int(rng.integers(1, 8))]
    else:
        at = int(rng.integers(len(data) + 1))
        data[at:at] = rng.bytes(int(rng.integers(1, 8)))
    return bytes(data)


def _answer(channel: grpc.Channel, method: str, kind: str, payload: bytes) -> grpc.StatusCode:
    try:
        if kind == UU:
            channel.unary_unary(method)(payload, timeout=2)
        elif kind == US:
            list(channel.unary_stream(method)(payload, timeout=0.3))
        else:
            channel.stream_unary(method)(iter([payload]), timeout=2)
    except grpc.RpcError as error:
        return error.code()
    return S.OK


@pytest.mark.parametrize("method", sorted(FUZZ_SEEDS), ids=lambda m: m.rsplit("/", 1)[-1])
def test_the_wire_fuzzer_gets_only_precise_answers(server, method) -> None:
    running, channel = server
    kind, seed = FUZZ_SEEDS[method]
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(method.encode()).digest()[:4],
                                               "little"))
    before = snapshot(running)
    answers = {}
    for _ in range(FUZZ_INPUTS):
        payload = _fuzzed(seed, rng)
        answers[payload] = _answer(channel, method, kind, payload)
    unexpected = {p.hex(): a for p, a in answers.items() if a not in FUZZ_ANSWERS}
    assert not unexpected
    assert_healthy(channel)
    assert wait_until(lambda: running.capacity.open("stream") == 0)
    assert snapshot(running) == before


JOIN_CASES = [("units-0", 0, 0, S.INVALID_ARGUMENT),
              ("units-2^32-1", (1 << 32) - 1, 0, S.INVALID_ARGUMENT),
              ("units-above-the-limit", ServerLimits().max_units_per_site + 1, 0,
               S.INVALID_ARGUMENT),
              ("base-version-unpublished", 1, 5, S.INVALID_ARGUMENT)]


@pytest.mark.parametrize(("units", "base", "status"), [c[1:] for c in JOIN_CASES],
                         ids=[c[0] for c in JOIN_CASES])
def test_an_absurd_join_is_refused_and_queues_nothing(server, units, base, status) -> None:
    running, channel = server
    site = enrolled(channel)
    before = snapshot(running)
    error = refused(lambda: fleet_pb2_grpc.FleetStub(channel).JoinRound(
        fleet_pb2.JoinRoundRequest(site=site, contributing_units=units, base_version=base),
        timeout=5))
    assert error.code() == status
    assert_healthy(channel)
    assert snapshot(running) == before


def test_a_long_name_is_not_echoed_back_whole(server) -> None:
    running, channel = server
    error = refused(lambda: fleet_pb2_grpc.FleetStub(channel).Enroll(
        enroll_request("x" * 100_000), timeout=5))
    assert error.code() == S.INVALID_ARGUMENT
    assert len(error.details()) <= running.limits.max_details_chars
    assert_healthy(channel)


def test_a_handler_failure_is_logged_with_its_rpc(server, monkeypatch, caplog) -> None:
    running, channel = server

    def broken():
        raise RuntimeError("a bug")
    monkeypatch.setattr(running.coordinator, "budget_status", broken)
    before = snapshot(running)
    with caplog.at_level(logging.ERROR, logger="fleetmind.server.service"):
        error = refused(lambda: audit_pb2_grpc.AuditStub(channel).Budget(
            audit_pb2.BudgetRequest(), timeout=5))
    assert error.code() == S.INTERNAL
    assert "a bug" not in error.details()  # the trace stays in the log
    assert any("/fleetmind.v1.Audit/Budget failed" in r.getMessage() for r in caplog.records)
    assert_healthy(channel)
    assert snapshot(running) == before


# ---- capacity and liveness --------------------------------------------------------------


def _watch(channel: grpc.Channel, after: int = 0):
    return models_pb2_grpc.ModelsStub(channel).Watch(
        models_pb2.WatchRequest(after_version=after), timeout=60)


def test_streams_past_the_cap_are_refused_not_queued(start) -> None:
    running, channel = start(ServerLimits(max_streams=4))
    before = snapshot(running)
    held = [_watch(channel) for _ in range(4)]
    assert wait_until(lambda: running.capacity.open("stream") == 4)
    error = refused(lambda: _watch(channel))
    assert error.code() == S.RESOURCE_EXHAUSTED
    assert_healthy(channel)
    for stream in held:
        stream.cancel()
    assert wait_until(lambda: running.capacity.open("stream") == 0)
    assert snapshot(running) == before


def test_calls_past_the_cap_are_refused_and_health_still_answers(start) -> None:
    running, channel = start(ServerLimits(max_calls=2))
    release = threading.Event()

    def nothing_yet() -> Iterator[fleet_pb2.MaskedVectorChunk]:
        release.wait(30)
        return
        yield  # an upload that never sends its first chunk
    fleet = fleet_pb2_grpc.FleetStub(channel)
    held = [fleet.SubmitMaskedVector.future(nothing_yet(), timeout=30) for _ in range(2)]
    assert wait_until(lambda: running.capacity.open("call") == 2)
    before = snapshot(running)
    error = refused(lambda: audit_pb2_grpc.AuditStub(channel).Budget(
        audit_pb2.BudgetRequest(), timeout=5))
    assert error.code() == S.RESOURCE_EXHAUSTED
    assert_healthy(channel)
    release.set()
    for call in held:
        assert call.exception(timeout=10).code() == S.INVALID_ARGUMENT  # empty upload
    assert wait_until(lambda: running.capacity.open("call") == 0)
    assert snapshot(running) == before


def test_300_idle_streams_leave_health_answering(server) -> None:
    """The review's freeze: 260 idle streams starved Health.Check. Here 300 are opened
    against the default cap (ServerConfig.max_workers = 256): 256 are held, 44 are
    refused RESOURCE_EXHAUSTED at once, and health answers (its latency is measured by
    docs/hardening.md's script, not asserted here)."""
    running, _ = server
    cap = running.limits.streams(256)
    channels = [grpc.insecure_channel(running.address) for _ in range(10)]
    try:
        before = snapshot(running)
        streams = [_watch(channels[i % 10]) if i % 2 else audit_pb2_grpc.AuditStub(
            channels[i % 10]).StreamLedger(audit_pb2.StreamLedgerRequest(follow=True),
                                           timeout=60) for i in range(300)]
        assert wait_until(lambda: sum(s.done() for s in streams) == 300 - cap, 60)
        assert running.capacity.open("stream") == cap
        turned_away = [s for s in streams if s.done()]
        assert {s.code() for s in turned_away} == {S.RESOURCE_EXHAUSTED}
        for c in channels[:3]:
            assert_healthy(c)
        fleet_pb2_grpc.FleetStub(channels[0]).Enroll(enroll_request("still-served"),
                                                      timeout=5)
        for stream in streams:
            stream.cancel()
        assert wait_until(lambda: running.capacity.open("stream") == 0, 30)
        assert snapshot(running)[1:] == before[1:]
    finally:
        for c in channels:
            c.close()


def test_a_fleet_certificate_holds_at_most_its_per_peer_streams(tmp_path: Path) -> None:
    ca, tls = aggregator_tls(tmp_path / "certs")
    running = serve(ServerConfig(data_dir=tmp_path / "data", tls=tls),
                    ServerLimits(max_streams_per_peer=2))
    try:
        def channel(name: str) -> grpc.Channel:
            return grpc.secure_channel(running.address, identity.channel_credentials(
                identity.issue_site(ca, name), ca.certificate_pem))
        with channel("never-enrolled") as hostile, channel("site-b") as other:
            before = snapshot(running)
            held = [_watch(hostile) for _ in range(2)]
            assert wait_until(lambda: running.capacity.open("stream") == 2)
            assert refused(lambda: _watch(hostile)).code() == S.RESOURCE_EXHAUSTED
            fine = _watch(other)  # another certificate is not held back
            assert wait_until(lambda: running.capacity.open("stream") == 3)
            assert_healthy(other)
            for stream in (*held, fine):
                stream.cancel()
            assert snapshot(running) == before
    finally:
        running.stop(grace=None)


LIFETIME = ServerLimits(stream_max_s=0.5)


def test_a_watch_ends_after_its_lifetime(start) -> None:
    running, channel = start(LIFETIME)
    assert list(_watch(channel, after=0)) == []  # ends OK; the caller watches again
    assert wait_until(lambda: running.capacity.open("stream") == 0)
    assert_healthy(channel)


def test_a_ledger_follow_ends_after_its_lifetime(start) -> None:
    running, channel = start(LIFETIME)
    follow = audit_pb2_grpc.AuditStub(channel).StreamLedger(
        audit_pb2.StreamLedgerRequest(follow=True), timeout=30)
    assert list(follow) == []
    assert wait_until(lambda: running.capacity.open("stream") == 0)
    assert_healthy(channel)


def test_a_queued_join_ends_after_its_lifetime_and_leaves_the_queue(start) -> None:
    running, channel = start(LIFETIME)
    site = enrolled(channel)
    stream = fleet_pb2_grpc.FleetStub(channel).JoinRound(
        fleet_pb2.JoinRoundRequest(site=site, contributing_units=1), timeout=30)
    events = [e for e in stream if e.WhichOneof("event") != "waiting"]
    assert [e.WhichOneof("event") for e in events] == ["aborted"]
    aborted = events[0].aborted
    assert (aborted.retry, aborted.phase, aborted.drop_reason, aborted.site_only) == (
        True, fleet_pb2.ROUND_PHASE_COHORT, fleet_pb2.DROP_REASON_COHORT_WAIT_EXPIRED, True)
    assert running.coordinator.waiting().ready_sites == 0
    assert wait_until(lambda: running.capacity.open("stream") == 0)
    assert_healthy(channel)


# ---- uploads ----------------------------------------------------------------------------


def collecting(started: Started) -> tuple[list[Site], list[list[fleet_pb2.MaskedVectorChunk]]]:
    """Three sites through keys and shares: the round now collects vectors."""
    _, channel = started
    sites = [Site(channel, f"site-{i}", seed=i) for i in range(3)]
    run_phases(sites, last="share")
    return sites, [s.masked_chunks() for s in sites]


def finish(sites: list[Site], chunks, running: RunningServer) -> None:
    """The honest uploads and unmasking: the round must publish version 1, so whatever
    was refused before changed nothing."""
    for s, c in zip(sites, chunks, strict=True):
        s.submit(c)
    for s in sites:
        s.unmask()
    assert {s.expect("completed").completed.version for s in sites} == {1}
    assert running.coordinator.registry.numbers()[-1] == 1
    assert len(running.uploads) == 0


def _copy(chunk: fleet_pb2.MaskedVectorChunk, **changes) -> fleet_pb2.MaskedVectorChunk:
    copy = fleet_pb2.MaskedVectorChunk()
    copy.CopyFrom(chunk)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def _one_byte_chunks(chunks):
    payload = b"".join(c.data for c in chunks)
    return [_copy(chunks[0], offset=i, data=payload[i:i + 1]) for i in range(len(payload))]


UPLOAD_CASES = [
    ("ring-bits-16-in-a-32-bit-round", lambda c: [_copy(c[0], ring_bits=16), *c[1:]],
     S.INVALID_ARGUMENT),
    ("total-bytes-short", lambda c: [_copy(c[0], total_bytes=c[0].total_bytes - 4)],
     S.INVALID_ARGUMENT),
    ("total-bytes-1e9", lambda c: [_copy(c[0], total_bytes=10**9)], S.RESOURCE_EXHAUSTED),
    ("one-byte-chunks", _one_byte_chunks, S.INVALID_ARGUMENT),
    ("round-not-running", lambda c: [_copy(x, round_id=99) for x in c],
     S.FAILED_PRECONDITION),
    ("sha256-of-another-payload", lambda c: [_copy(x, payload_sha256=hashlib.sha256(
        b"other").digest()) for x in c], S.INVALID_ARGUMENT),
    ("torn-after-first-chunk", lambda c: c[:1], S.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("mutate", "status"), [c[1:] for c in UPLOAD_CASES],
                         ids=[c[0] for c in UPLOAD_CASES])
def test_a_hostile_upload_is_refused_and_the_round_still_publishes(start, mutate,
                                                                   status) -> None:
    running, channel = start()
    sites, chunks = collecting((running, channel))
    before = snapshot(running)
    error = refused(lambda: sites[0].submit(mutate(chunks[0])))
    assert error.code() == status, error.details()
    assert_healthy(channel)
    assert snapshot(running) == before
    finish(sites, chunks, running)


def _stalled(first: fleet_pb2.MaskedVectorChunk, release: threading.Event):
    yield first
    release.wait(30)


@pytest.mark.parametrize(("limits", "other", "status", "torn"), [
    # The same site again: its slot is claimed at the first chunk; the first upload, torn
    # when released, was never counted.
    (None, 0, S.ALREADY_EXISTS, S.INVALID_ARGUMENT),
    # Another site, past the bytes in flight across sites (200: one vector).
    (ServerLimits(max_upload_bytes_in_flight=200), 1, S.RESOURCE_EXHAUSTED, None),
], ids=["a-second-upload-of-the-slot", "upload-bytes-in-flight-capped-across-sites"])
def test_an_upload_while_one_is_in_flight_is_refused(start, limits, other, status,
                                                     torn) -> None:
    running, channel = start(limits)
    sites, chunks = collecting((running, channel))
    release = threading.Event()
    first = sites[0].fleet.SubmitMaskedVector.future(_stalled(chunks[0][0], release),
                                                     timeout=30)
    assert wait_until(lambda: len(running.uploads) == 1)
    before = snapshot(running)
    assert refused(lambda: sites[other].submit(chunks[other])).code() == status
    assert_healthy(channel)
    assert snapshot(running) == before
    release.set()
    error = first.exception(timeout=10)
    if torn is not None:
        assert error.code() == torn
    finish(sites, chunks, running)


def test_an_idle_upload_is_cancelled_and_frees_its_slot(start) -> None:
    running, channel = start(ServerLimits(upload_idle_s=0.3))
    sites, chunks = collecting((running, channel))
    release = threading.Event()
    before = snapshot(running)
    stalled = sites[0].fleet.SubmitMaskedVector.future(_stalled(chunks[0][0], release),
                                                       timeout=30)
    assert stalled.exception(timeout=10).code() == S.CANCELLED
    release.set()
    assert wait_until(lambda: len(running.uploads) == 0)
    assert_healthy(channel)
    assert snapshot(running) == before
    finish(sites, chunks, running)


def test_an_upload_open_when_its_phase_closes_is_cancelled(start) -> None:
    running, channel = start()
    sites, chunks = collecting((running, channel))
    release = threading.Event()
    stalled = sites[0].fleet.SubmitMaskedVector.future(_stalled(chunks[0][0], release),
                                                       timeout=30)
    assert wait_until(lambda: len(running.uploads) == 1)
    real = running.coordinator.clock
    running.coordinator.clock = lambda: real() + 3600  # the phase deadline passes
    assert stalled.exception(timeout=10).code() == S.CANCELLED
    release.set()
    assert all(s.expect("aborted").aborted.retry for s in sites)  # nobody uploaded
    assert wait_until(lambda: len(running.uploads) == 0)
    assert running.coordinator.registry.numbers() == [0]
    assert_healthy(channel)


# ---- poisoned aggregates ----------------------------------------------------------------


class Forger(Site):
    """A cohort site whose payload words are forged after honest encoding."""

    forge: Callable[[np.ndarray, int], np.ndarray] = staticmethod(lambda ring, s: ring)

    def masked_chunks(self) -> list[fleet_pb2.MaskedVectorChunk]:
        bundle = codec.shares_for_site_from_wire(self.expect("shares_for_site").shares_for_site)
        delta_code, weight_code = codec.payload_codes(self.wire_config)
        flat = np.concatenate([self.weight * self.delta[n].reshape(-1) for n in
                               sorted(self.delta)])
        ring = secagg_payload(flat, self.weight, delta_code, weight_code).astype(np.int64)
        ring = self.forge(ring, round(weight_code.scale)) & ((1 << self.config.ring_bits) - 1)
        masked, self.state = self.state.receive(bundle).mask(ring.astype(np.uint32))
        return list(codec.masked_input_to_chunks(masked, self.config.ring_bits, chunk_bytes=64))


POISON_CASES = [
    # the review's attack: a weight word cancelling the two honest weights (sum ~ 1/scale)
    ("weight-cancels-the-cohort", weight_word(-2.0 + 1e-6), "weights sum"),
    ("weight-sum-negative", weight_word(-5.0), "weights sum"),
    ("weight-sum-above-the-cohort", weight_word(50.0), "weights sum"),
    ("weight-below-min-site-weight", weight_word(-1.99), "weights sum"),
    ("delta-inflated-100x", inflate, "norm"),
]


@pytest.mark.parametrize(("forge", "reason"), [c[1:] for c in POISON_CASES],
                         ids=[c[0] for c in POISON_CASES])
def test_a_poisoned_aggregate_is_never_signed(start, forge, reason) -> None:
    running, channel = start()
    sites = [Site(channel, "site-0", seed=0), Site(channel, "site-1", seed=1),
             Forger(channel, "site-2", seed=2)]
    sites[2].forge = forge
    before = snapshot(running)
    run_round(sites)
    aborted = {(e.retry, e.reason) for e in (s.expect("aborted").aborted for s in sites)}
    assert len(aborted) == 1
    ((retry, why),) = aborted
    assert retry and "rejected" in why and reason in why
    assert running.coordinator.registry.numbers() == [0]  # nothing signed or published
    # No version; the rejection itself is a signed ledger entry, with the check that failed.
    stopped = running.coordinator.ledger.head().record
    assert isinstance(stopped, StoppedRound)
    assert (stopped.round_id, stopped.outcome, stopped.phase, stopped.check) == (
        1, "rejected", "merge", {"weights sum": "weight_sum", "norm": "norm"}[reason])
    rejected = running.coordinator.rejected()
    assert [r["round_id"] for r in rejected] == [1] and reason in rejected[0]["reason"]
    assert len(rejected[0]["payload_sha256s"]) == 3
    # The aggregator saw the noised sum, so the round's charge is spent.
    assert len(running.coordinator.budget.charges) == before[5] + 1
    assert_healthy(channel)


def test_group_testing_quarantines_the_site_that_aborts_every_round(tmp_path: Path) -> None:
    """The review's "a negative weight aborts every round, indefinitely": masked vectors
    hide who did it, but cohorts of half the suspects find it in a few rounds. The forger
    is quarantined (PERMISSION_DENIED at join), no honest site is, and rounds publish."""
    running = serve(ServerConfig(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=8, deadline_s=0.5, phase_deadline_s=30),
        privacy=PrivacyPolicy(clip_norm=1.0, noise_multiplier=1.0, epsilon_budget=1e4,
                              fixed_point_clip=1.0), adapter=SPEC))
    channel = grpc.insecure_channel(running.address)
    coordinator = running.coordinator
    try:
        sites = [Site(channel, f"site-{i}", seed=i) for i in range(7)]
        forger = Forger(channel, "forger", seed=7)
        forger.forge = weight_word(-50.0)
        everyone = [forger, *sites]  # the forger queues first: the worst case for halving
        by_id = {s.id: s for s in everyone}
        queued: set[int] = set()
        outcomes = []
        for _ in range(10):
            if coordinator.quarantined():
                break
            for s in everyone:
                if s.id not in queued:
                    s.join()
                    queued.add(s.id)
            assert wait_until(lambda: coordinator.cohort() != ())
            members = [by_id[i] for i in coordinator.cohort()]
            run_phases(members, first="advertise")  # joined before
            outcome = {end_of(m) for m in members}
            assert len(outcome) == 1
            outcomes.append((tuple(m.id for m in members), outcome.pop()))
            queued -= {m.id for m in members}
        assert coordinator.quarantined().keys() == {forger.id}, outcomes
        # The rejection that pinned it is in the ledger, naming it; the chain verifies.
        stops = [e.record for e in coordinator.ledger.entries()
                 if isinstance(e.record, StoppedRound)]
        assert stops[-1].quarantined == (forger.id,)
        assert all(not stop.quarantined for stop in stops[:-1])
        coordinator.ledger.verify()
        assert any(kind == "completed" for _, kind in outcomes)
        error = refused(lambda: fleet_pb2_grpc.FleetStub(channel).JoinRound(
            fleet_pb2.JoinRoundRequest(site=forger.id, contributing_units=1), timeout=5))
        assert error.code() == S.PERMISSION_DENIED and "quarantined" in error.details()
        assert coordinator.release(forger.id) and coordinator.quarantined() == {}
        assert_healthy(channel)
    finally:
        channel.close()
        running.stop(grace=None)


def end_of(site: Site) -> str:
    for event in site.stream:
        if event.WhichOneof("event") in ("completed", "aborted"):
            return event.WhichOneof("event")
    raise AssertionError(f"site {site.id}: the stream ended without the round's end")


def test_an_honest_round_after_a_rejected_one_publishes(start) -> None:
    _, channel = start()
    sites = [Site(channel, "site-0", seed=0), Site(channel, "site-1", seed=1),
             Forger(channel, "site-2", seed=2)]
    sites[2].forge = weight_word(-2.0 + 1e-6)
    run_round(sites)
    for s in sites:
        s.expect("aborted")
    sites[2].forge = Forger.forge
    run_round(sites)
    assert {s.expect("completed").completed.version for s in sites} == {1}


# ---- the site: forward only, rollbacks stay, a key and sane norms to activate -----------


class Published:
    """An aggregator that publishes what a test tells it to, and a site folder."""

    def __init__(self, running: RunningServer, channel: grpc.Channel, site: Path) -> None:
        self.running, self.channel, self.site = running, channel, site
        self.registry = running.coordinator.registry
        self.key = self.registry.public_key.public_bytes_raw()

    def publish(self, change: Callable[[np.ndarray], np.ndarray] = lambda b: b + 0.01) -> int:
        latest = self.registry.latest()
        _, b = latest.tensors()
        round_id = (latest.manifest.round_id or 0) + 1
        return self.registry.publish({m: change(t) for m, t in b.items()}, Release(
            round_id=round_id, cohort_size=3, clip_norm=1.0, noise_multiplier=0.8,
            noise_mode="distributed", epsilon=0.1 * round_id, delta=1e-5)).number

    def download(self) -> Path:
        return site_versions.download_latest(self.channel, self.site, self.key)

    def take_latest(self) -> int:
        return site_versions.activate(self.site, self.download(), self.key)


@pytest.fixture
def published(server, tmp_path: Path) -> Published:
    return Published(*server, tmp_path / "site")


def test_an_older_signed_version_is_not_activated(published) -> None:
    old = published.download()
    published.take_latest()
    published.publish()
    assert published.take_latest() == 1
    with pytest.raises(site_versions.VersionError, match="only move forward"):
        site_versions.activate(published.site, old, published.key)  # a downgrade
    assert site_versions.current_version(published.site) == 1


def test_a_rollback_stays_until_a_newer_version(published) -> None:
    published.take_latest()
    published.publish()
    published.take_latest()
    assert site_versions.rollback(published.site) == (1, 0)
    # The site loop's next refresh: download_latest refuses version 1 before fetching.
    with pytest.raises(site_versions.VersionError, match="rolled back from version 1"):
        published.download()
    with pytest.raises(site_versions.VersionError, match="rolled back"):
        site_versions.activate(published.site, published.site / "versions" / "00000001",
                               published.key)
    assert site_versions.current_version(published.site) == 0
    published.publish()
    assert published.take_latest() == 2  # a newer version lifts the pin
    assert site_versions.rollback_pin(published.site) is None


def test_activation_without_any_key_is_refused(published, tmp_path: Path) -> None:
    folder = published.download()
    bare = tmp_path / "bare-site"
    (bare / "versions").mkdir(parents=True)
    copy = bare / "versions" / folder.name
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(site_versions.VersionError, match="no aggregator key"):
        site_versions.activate(bare, copy)
    assert site_versions.current_version(bare) is None


def test_a_folder_tampered_after_download_is_refused_without_a_key_argument(published) -> None:
    folder = published.download()
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(site_versions.VersionError):
        site_versions.activate(published.site, folder)  # the recorded key still checks it
    assert site_versions.current_version(published.site) is None


SITE_POISON_CASES = [("b-3e6", lambda b: b + 3e6, "reaches"),
                     ("b-minus-3e6", lambda b: b - 3e6, "reaches"),
                     ("b-step-past-the-clip", lambda b: b + 900.0, "moved B")]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in SITE_POISON_CASES],
                         ids=[c[0] for c in SITE_POISON_CASES])
def test_a_signed_but_poisoned_version_is_not_activated(published, change, message) -> None:
    published.take_latest()
    published.publish(change)
    with pytest.raises(site_versions.VersionError, match=message):
        published.take_latest()
    assert site_versions.current_version(published.site) == 0


# ---- limits from the config file -------------------------------------------------------


def test_a_limits_table_in_the_config_file_reaches_serve(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text('data_dir = "data"\ninsecure = true\nlisten = "127.0.0.1:0"\n\n'
                    "[limits]\nmax_calls = 7\nmax_upload_bytes_in_flight = 4096\n")
    loaded = load_config(path)
    assert (loaded.limits.max_calls, loaded.limits.max_upload_bytes_in_flight) == (7, 4096)
    running = serve(loaded)
    try:
        assert running.limits == loaded.limits
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize(("table", "match"), [
    ("[limits]\nmax_calls = -1\n", r"\[limits\]: limits.max_calls=-1"),
    ("[limits]\nmax_callz = 4\n", r"\[limits\]: .*max_callz"),
    ("limits = 3\n", r"\[limits\] must be a table"),
])
def test_a_bad_limits_table_is_refused_with_the_key(tmp_path: Path, table, match) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(f'data_dir = "data"\ninsecure = true\n{table}')
    with pytest.raises(ConfigError, match=match):
        load_config(path)
