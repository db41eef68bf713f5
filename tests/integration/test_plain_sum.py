"""The ablation without secure aggregation (cohort.secure_aggregation = false): rounds over
real loopback gRPC in which sites upload their encoded vectors unmasked through the
masked-vector path, and the aggregator sums, merges and publishes exactly as under SecAgg+,
recording in the ledger and the manifest that the round was not securely aggregated."""

from __future__ import annotations

import hashlib
import json

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import at_once
from support.hostile import assert_healthy, inflate, snapshot, weight_word
from support.plain_rounds import Site, flat, joined, plain_config
from support.secagg_rounds import bad_uploads, reattach_after_restart

from fleetmind.aggregation.merge import FedAvg, exact_merge, open_secagg_sum, secagg_payload
from fleetmind.aggregation.records import RoundRecord
from fleetmind.aggregation.secagg import NeighbourGraph, ProtocolError, RoundConfig, crypto
from fleetmind.aggregation.secagg.messages import MaskedInput, unpack_ring
from fleetmind.aggregation.secagg.server_completed import ServerAborted, ServerCompleted
from fleetmind.aggregation.secagg.server_r2_plain_input_collection import (
    ServerPlainInputCollection,
)
from fleetmind.cli.main import main
from fleetmind.client.agent import PlainSumRefusedError, RoundResult, SiteUpdate, participate
from fleetmind.client.outbox import Outbox
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2
from fleetmind.server.config import (
    ConfigError,
    ServerConfig,
    load_config,
)
from fleetmind.server.service import serve
from fleetmind.server.versions import Manifest
from fleetmind.sim.bench.wire import SHAPES

UPLOAD = "/fleetmind.v1.Fleet/SubmitMaskedVector"


def quantisation_bound(wire: fleet_pb2.RoundConfig, weight_sum: float, count: int) -> float:
    """|S'/W' - S/W| for decoded sums (as tests/support/secagg_rounds.py derives it)."""
    delta_code, weight_code = codec.payload_codes(wire)
    e_d, e_w = delta_code.sum_error_bound(count), weight_code.sum_error_bound(count)
    return e_d / (weight_sum - e_w) + 0.3 * weight_sum * e_w / (
        weight_sum * (weight_sum - e_w)) + 1e-6


def mean_delta(sites: list[Site]) -> dict[str, np.ndarray]:
    return {n: sum(s.delta[n] for s in sites) / len(sites) for n in SHAPES}


# ---- the library state, driven by plain messages -----------------------------------------


def test_the_plain_state_sums_what_arrived_and_refuses_a_small_cohort() -> None:
    identities = {s: crypto.identity_public_bytes(crypto.new_identity()) for s in (1, 2, 3, 4)}
    config = RoundConfig(1, NeighbourGraph.full(identities), threshold=3, min_cohort=3,
                         vector_length=4, ring_bits=32, identities=identities)
    vectors = {s: np.full(4, 2**31 + s, np.uint32) for s in identities}
    state = ServerPlainInputCollection(config)
    for site in (1, 2, 3):
        state.receive(MaskedInput(1, site, vectors[site]))
    with pytest.raises(ProtocolError) as refused:
        state.receive(MaskedInput(1, 2, vectors[4]))
    assert refused.value.kind == "replay"
    with pytest.raises(ProtocolError) as refused:
        state.receive(MaskedInput(1, 9, vectors[4]))
    assert refused.value.kind == "unknown_site"
    done = state.close()
    assert isinstance(done, ServerCompleted)
    assert (done.contributors, done.dropped) == (frozenset({1, 2, 3}), frozenset({4}))
    want = sum(vectors[s].astype(np.uint64) for s in (1, 2, 3)) % 2**32
    assert np.array_equal(done.cohort_sum, want.astype(np.uint32))

    short = ServerPlainInputCollection(config)
    for site in (1, 2):
        short.receive(MaskedInput(1, site, vectors[site]))
    aborted = short.close()
    assert isinstance(aborted, ServerAborted)
    assert "2 unmasked inputs, minimum cohort 3: refusing to sum" in aborted.reason


# ---- whole rounds over loopback gRPC -------------------------------------------------------


class CallWatch(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Records which Fleet methods a site called, and the bytes of its upload."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self.sent = bytearray()

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.methods.append(client_call_details.method)
        return continuation(client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        self.methods.append(client_call_details.method)

        def watched():
            for chunk in request_iterator:
                self.sent += chunk.data
                yield chunk
        return continuation(client_call_details, watched())


def run_agents(address: str, updates: list[SiteUpdate], outboxes: list[Outbox],
               keys: list[Ed25519PrivateKey], watches: list[CallWatch],
               allow_plain_sum: bool = True) -> list[RoundResult | BaseException | None]:
    def run(i: int) -> RoundResult:
        with grpc.intercept_channel(grpc.insecure_channel(address), watches[i]) as channel:
            return participate(channel, keys[i], f"site-{i}", updates[i], outboxes[i],
                               add_noise=False, timeout=20, allow_plain_sum=allow_plain_sum)

    return at_once(len(updates), run)


def test_a_plain_round_publishes_the_librarys_merge_and_says_so(tmp_path, capsys) -> None:
    running = serve(plain_config(tmp_path / "data"))
    try:
        rng = np.random.default_rng(0)
        weights = (1.0, 0.5, 1.0 / np.sqrt(2.0))
        updates = [SiteUpdate(clip_norm=1.0, privacy_unit="session",
            delta={n: rng.uniform(-0.15, 0.15, s).astype(np.float32) for n, s in SHAPES.items()},
            weight=float(w), session_ids=(f"s{i}",)) for i, w in enumerate(weights)]
        keys = [Ed25519PrivateKey.generate() for _ in updates]
        outboxes = [Outbox(tmp_path / f"site-{i}.sqlite", k) for i, k in enumerate(keys)]
        watches = [CallWatch() for _ in updates]
        done = run_agents(running.address, updates, outboxes, keys, watches)
        assert all(isinstance(r, RoundResult) for r in done), done
        assert {(r.version, r.cohort_size, r.dropped) for r in done} == {(1, 3, ())}
        wire = done[0].round_config
        assert wire.plain_sum

        # The sites took the short path: an upload and nothing of rounds 0, 1 or 3.
        delta_code, weight_code = codec.payload_codes(wire)
        rings = []
        for i, (watch, result) in enumerate(zip(watches, done, strict=True)):
            assert [m for m in watch.methods if m != "/fleetmind.v1.Fleet/Enroll"] == [UPLOAD]
            assert hashlib.sha256(watch.sent).hexdigest() == result.payload_sha256
            [entry] = list(outboxes[i])
            assert entry.record.payload_sha256 == result.payload_sha256
            # The site's own record says it went unmasked, and how it was clipped.
            assert entry.record.secure_aggregation is False
            assert (entry.record.privacy_unit, entry.record.clip_norm) == ("session", 1.0)
            outboxes[i].close()
            # Unmasked: the bytes sent decode to the site's own weighted update.
            ring = unpack_ring(bytes(watch.sent), wire.ring_bits)
            sent = delta_code.decode_sum(ring[:-1])
            assert np.abs(sent - weights[i] * flat(updates[i].delta)).max() \
                <= delta_code.sum_error_bound(1)
            rings.append(ring)

        # The version is the library's decode and merge of exactly the uploaded vectors...
        _, b = running.coordinator.registry.get(1).tensors()
        ring_sum = np.zeros_like(rings[0])
        for ring in rings:
            ring_sum += ring  # uint32 wraps: the ring's sum mod 2^32
        weighted, weight_sum = open_secagg_sum(ring_sum, SHAPES, delta_code, weight_code)
        genesis = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
        library, _ = exact_merge(genesis, weighted, weight_sum, FedAvg(1.0))
        for name in SHAPES:  # up to float32 rounding of the decoded sum
            np.testing.assert_allclose(b[name], library[name], rtol=0, atol=1e-6)
        # ... which is the weighted mean of the deltas, within the fixed-point code's error.
        total = sum(weights)
        bound = quantisation_bound(wire, total, 3)
        for name in SHAPES:
            want = sum(w * u.delta[name] for w, u in zip(weights, updates, strict=True)) / total
            assert np.abs(b[name] - want).max() <= bound, name

        # The auditor sees it: the ledger entry and the signed manifest both say so.
        record = running.coordinator.ledger.head().record
        assert (record.round_id, record.cohort_size, record.secure_aggregation) == (1, 3, False)
        assert (record.privacy_unit, record.clip_norm) == ("session", 1.0)
        assert record.payload_sha256s == tuple(sorted(r.payload_sha256 for r in done))
        assert Manifest.from_bytes(running.coordinator.registry.get(1).manifest_bytes()) \
            .secure_aggregation is False
        public = tmp_path / "aggregator.pub"
        public.write_bytes(running.coordinator.registry.public_key.public_bytes_raw())
        server = ["--server", running.address, "--insecure", "--aggregator-key", str(public)]
        assert main(["audit", "ledger", *server, "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)["rounds"]
        assert row["secure_aggregation"] is False
        assert main(["audit", "ledger", *server]) == 0
        assert "PLAIN (unmasked)" in capsys.readouterr().out
        folder = tmp_path / "data" / "versions" / "00000001"
        assert main(["audit", "version", str(folder), *server]) == 0  # manifest and entry agree
        assert "PLAIN (unmasked)" in capsys.readouterr().out
    finally:
        running.stop(grace=None)


def test_a_site_sends_nothing_unmasked_unless_it_allows_it(tmp_path) -> None:
    running = serve(plain_config(tmp_path / "data"))
    try:
        rng = np.random.default_rng(1)
        updates = [SiteUpdate(
        clip_norm=1.0, privacy_unit="session",
        delta={n: rng.uniform(-0.1, 0.1, s).astype(np.float32)
               for n, s in SHAPES.items()}) for _ in range(3)]
        keys = [Ed25519PrivateKey.generate() for _ in updates]
        outboxes = [Outbox(tmp_path / f"site-{i}.sqlite", k) for i, k in enumerate(keys)]
        watches = [CallWatch() for _ in updates]
        done = run_agents(running.address, updates, outboxes, keys, watches,
                          allow_plain_sum=False)
        assert all(isinstance(e, PlainSumRefusedError) for e in done), done
        assert "nothing was sent" in str(done[0])
        for watch, outbox in zip(watches, outboxes, strict=True):
            assert UPLOAD not in watch.methods
            assert list(outbox) == []
            outbox.close()
    finally:
        running.stop(grace=None)


def test_a_site_that_never_uploads_leaves_the_others_merge(tmp_path, serve_aggregator) -> None:
    running = serve_aggregator(plain_config(tmp_path / "data", target=4, phase_deadline_s=1.0))
    with grpc.insecure_channel(running.address) as channel:
        sites = joined(channel, 4, seed=30)
        survivors, gone = sites[:3], sites[3]
        for s in survivors:  # the fourth vanishes: the upload phase closes at its deadline
            s.upload()
        done = {(d.version, d.cohort_size, tuple(d.dropped))
                for d in (s.expect("completed").completed for s in sites[:3])}
        assert done == {(1, 3, (gone.id,))}
        gone.expect("config")
        assert tuple(gone.expect("completed").completed.dropped) == (gone.id,)
    _, merged = running.coordinator.registry.get(1).tensors()
    bound = quantisation_bound(survivors[0].wire, 3.0, 3)
    for name, want in mean_delta(survivors).items():
        assert np.abs(merged[name] - want).max() <= bound
    record = running.coordinator.ledger.head().record
    assert (record.cohort_size, record.dropouts, record.secure_aggregation) == (3, 1, False)


def test_a_plain_round_below_the_minimum_cohort_publishes_nothing(tmp_path,
                                                                 serve_aggregator) -> None:
    running = serve_aggregator(plain_config(tmp_path / "data", target=4, phase_deadline_s=1.0))
    with grpc.insecure_channel(running.address) as channel:
        sites = joined(channel, 4, seed=40)
        for s in sites[:2]:
            s.upload()
        reason = sites[0].expect("aborted").aborted.reason
        assert "2 unmasked inputs, minimum cohort 3: refusing to sum" in reason
    assert running.coordinator.registry.numbers() == [0]
    # The ledger records the aborted round, the two vectors it received and nothing spent.
    stopped = running.coordinator.ledger.head().record
    assert (stopped.outcome, stopped.drop_reason, stopped.contributors, stopped.version,
            stopped.epsilon_round, len(stopped.payload_sha256s)) == (
        "aborted", "below_min_cohort", 0, 0, 0.0, 2)
    assert running.coordinator.budget_status().rounds == 0


FORGED = [("weight-negative", weight_word(-5.0)), ("weight-zero", weight_word(0.0)),
          ("weight-above-1", weight_word(50.0)), ("delta-inflated-100x", inflate)]


def test_bad_uploads_are_refused_with_their_status_and_change_nothing(tmp_path) -> None:
    running = serve(plain_config(tmp_path / "data"))
    try:
        with grpc.insecure_channel(running.address) as channel:
            sites = joined(channel, 3, seed=10)
            a, b, c = sites
            for s in sites:
                s.setup()
            mine = a.chunks()
            # No key phases in a plain round: an advertisement is out of step.
            with pytest.raises(grpc.RpcError) as refused:
                a.fleet.AdvertiseKeys(fleet_pb2.KeyAdvertisement(
                    round_id=a.round_id, site=a.id, mask_key=b"\1" * 32,
                    share_key=b"\2" * 32, signature=bytes(64)), timeout=5)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "without secure aggregation" in refused.value.details()
            for bad, status in bad_uploads(mine):
                with pytest.raises(grpc.RpcError) as refused:
                    a.submit(bad)
                assert refused.value.code() == status
            # Unmasked vectors are checked one by one at upload: a forged one is refused
            # and changes nothing, so the round goes on (was tests/integration/test_hostile.py).
            delta_code, weight_code = codec.payload_codes(a.wire)
            for name, forge in FORGED:
                ring = secagg_payload(flat(a.delta), 1.0, delta_code, weight_code)
                ring = forge(ring.astype(np.int64), round(weight_code.scale)) & 0xFFFFFFFF
                forged = list(codec.masked_input_to_chunks(MaskedInput(
                    a.round_id, a.id, ring.astype(np.uint32)), 32, chunk_bytes=64))
                before = snapshot(running)
                with pytest.raises(grpc.RpcError) as refused:
                    a.submit(forged)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                    name, refused.value.details())
                assert_healthy(channel)
                assert snapshot(running) == before, name

            receipt = a.submit(mine)
            assert a.submit(mine) == receipt  # the retry after a lost acknowledgement
            # A different vector for the same (round, site) is a replay, whatever it holds.
            other = {n: -t for n, t in a.delta.items()}
            with pytest.raises(grpc.RpcError) as refused:
                a.submit(a.chunks(other))
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            b.submit(b.chunks())
            c.submit(c.chunks())
            assert {s.expect("completed").completed.version for s in sites} == {1}

        # Nothing the refusals carried reached the sum: the version is the honest merge.
        _, merged = running.coordinator.registry.get(1).tensors()
        bound = quantisation_bound(a.wire, 3.0, 3)
        for name, want in mean_delta(sites).items():
            assert np.abs(merged[name] - want).max() <= bound
        record = running.coordinator.ledger.head().record
        assert receipt.payload_sha256.hex() in record.payload_sha256s
    finally:
        running.stop(grace=None)


def test_a_plain_round_in_flight_at_restart_is_abandoned_and_run_again(tmp_path) -> None:
    data = tmp_path / "data"
    running = serve(plain_config(data))
    channel = grpc.insecure_channel(running.address)
    sites = joined(channel, 3, seed=20)
    sites[0].upload()  # one vector is in when the aggregator goes away
    channel.close()
    running.stop(grace=None)

    running = serve(plain_config(data))
    try:
        with grpc.insecure_channel(running.address) as channel:
            reattach_after_restart(sites, channel)
            for s in sites:
                s.join()
            for s in sites:
                s.upload()
            assert {s.round_id for s in sites} == {2}
            assert {s.expect("completed").completed.version for s in sites} == {1}
        head = running.coordinator.ledger.head().record
        assert (head.round_id, head.secure_aggregation) == (2, False)
        assert running.coordinator.budget_status().rounds == 1
    finally:
        running.stop(grace=None)


# ---- configuration and records ------------------------------------------------------------


def test_plain_mode_is_refused_off_loopback_at_config_load(tmp_path) -> None:
    def load(listen: str, value: object) -> ServerConfig:
        path = tmp_path / "aggregator.json"
        path.write_text(json.dumps({
            "data_dir": "data", "listen": listen,
            "tls": {"certificate": "a.crt", "private_key": "a.key", "ca_certificate": "ca.crt"},
            "cohort": {"secure_aggregation": value}}))
        return load_config(path)

    with pytest.raises(ConfigError, match=r"cohort\.secure_aggregation=false refused on "
                                          r"listen='0\.0\.0\.0:7443'.*loopback"):
        load("0.0.0.0:7443", False)
    with pytest.raises(ConfigError, match="must be true or false"):
        load("127.0.0.1:7443", "false")
    assert load("127.0.0.1:7443", False).cohort.secure_aggregation is False
    assert load("[::1]:7443", False).cohort.secure_aggregation is False
    assert load("0.0.0.0:7443", True).cohort.secure_aggregation is True  # the default
    toml = tmp_path / "aggregator.toml"
    toml.write_text('data_dir = "data"\ninsecure = true\nlisten = "localhost:0"\n'
                    '[cohort]\nsecure_aggregation = false\n')
    assert load_config(toml).cohort.secure_aggregation is False


def test_old_ledger_entries_and_manifests_keep_their_bytes() -> None:
    record = RoundRecord(round_id=1, cohort_size=3, dropouts=0, clip_norm=1.0,
                         noise_multiplier=1.0, noise_mode="distributed", epsilon_round=1.0,
                         epsilon_total=1.0, delta=1e-5, version=1, version_hash="ab" * 32,
                         recorded_at_ms=1)
    body = record.to_body()
    assert b"secure_aggregation" not in body  # as every entry before the flag was written
    assert RoundRecord.from_body(body).secure_aggregation is True
    plain = RoundRecord(**{**json.loads(body), "secure_aggregation": False})
    assert b'"secure_aggregation":false' in plain.to_body()
    assert RoundRecord.from_body(plain.to_body()) == plain

    fields = dict(version=1, parent=0, base_model_id="toy", base_model_sha256="cd" * 32,
                  frozen_a_seed=7, round_id=1, cohort_size=3, clip_norm=1.0,
                  noise_multiplier=1.0, noise_mode="distributed", epsilon=1.0, delta=1e-5,
                  files={"adapter_config.json": "00" * 32,
                         "adapter_model.safetensors": "11" * 32})
    raw = Manifest(**fields).to_bytes()
    assert b"secure_aggregation" not in raw
    assert Manifest.from_bytes(raw).secure_aggregation is True
    unmasked = Manifest(**fields, secure_aggregation=False)
    assert Manifest.from_bytes(unmasked.to_bytes()) == unmasked
    with pytest.raises(ValueError, match="genesis"):
        Manifest(**{**fields, "version": 0, "parent": None, "round_id": None,
                    "cohort_size": 0, "clip_norm": 0.0, "noise_multiplier": 0.0,
                    "noise_mode": "none", "epsilon": 0.0, "delta": 0.0},
                 secure_aggregation=False)
