"""Three sites run `client.agent.participate` in threads against the real aggregator over
loopback gRPC: the published B is the library's merge of their updates, and each site's
outbox holds one verified record, written before its upload, naming the payload hash the
aggregator acknowledged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import at_once, each_returned

from fleetmind.aggregation.records import verify_outbox
from fleetmind.aggregation.secagg import DropReason, RoundPhase
from fleetmind.client.agent import (
    RoundAbortedError,
    RoundResult,
    SiteUpdate,
    may_be_summed,
    participate,
)
from fleetmind.client.outbox import Outbox
from fleetmind.client.scrub import ScrubReport
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2, models_pb2, models_pb2_grpc
from fleetmind.server import versions
from fleetmind.server.config import CohortPolicy, ServerConfig
from fleetmind.server.service import serve
from fleetmind.sim.bench.wire import PRIVACY, SHAPES, SPEC


class UploadWatch(grpc.StreamUnaryClientInterceptor):
    """Sees each masked-vector upload as it leaves: the bytes sent, and whether the outbox
    already held a record of them when the first chunk went out."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.sent = bytearray()
        self.recorded_first: list[bool] = []

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        def watched():
            for chunk in request_iterator:
                if chunk.offset == 0:
                    head = self.outbox.head()
                    self.recorded_first.append(
                        head is not None
                        and head.record.payload_sha256 == chunk.payload_sha256.hex())
                self.sent += chunk.data
                yield chunk
        return continuation(client_call_details, watched())


def run_sites(channels, keys, updates, outboxes, add_noise: bool) -> list[RoundResult]:
    """`participate` for every site at once, one thread each; fails on a site's error."""
    return each_returned(at_once(len(updates), lambda i: participate(
        channels[i], keys[i], f"site-{i}", updates[i], outboxes[i], add_noise=add_noise,
        timeout=20)), RoundResult)


@pytest.fixture
def aggregator_config(tmp_path: Path) -> ServerConfig:
    """The config the shared `aggregator` fixture serves."""
    return ServerConfig(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=30, phase_deadline_s=30),
        privacy=PRIVACY, adapter=SPEC)


def test_three_sites_participate_and_publish_the_merge(aggregator, tmp_path) -> None:
    rng = np.random.default_rng(0)
    weights = (1.0, 0.5, 1.0 / np.sqrt(2.0))  # fresh, and two staleness weights
    updates = [SiteUpdate(clip_norm=1.0, privacy_unit="session",
        delta={n: rng.uniform(-0.3, 0.3, s).astype(np.float32) for n, s in SHAPES.items()},
        weight=float(weight), session_ids=(f"s{i}-a", f"s{i}-b"),
        scrubbed=ScrubReport(email=i), norm_before_clip=5.0) for i, weight in
        enumerate(weights)]
    keys = [Ed25519PrivateKey.generate() for _ in updates]
    outboxes = [Outbox(tmp_path / f"site-{i}" / "outbox.sqlite", k) for i, k in enumerate(keys)]
    watches = [UploadWatch(o) for o in outboxes]
    channels = [grpc.intercept_channel(grpc.insecure_channel(aggregator.address), w)
                for w in watches]
    # Site noise off so B can be compared with the noiseless merge; the outbox says so.
    done = run_sites(channels, keys, updates, outboxes, add_noise=False)
    assert {(r.version, r.cohort_size, r.dropped) for r in done} == {(1, 3, ())}
    assert sorted(r.site for r in done) == [1, 2, 3]

    # Each outbox: one verified record, on disk before the upload, of exactly what was sent
    # and what the aggregator acknowledged.
    for i, (outbox, watch, result) in enumerate(zip(outboxes, watches, done, strict=True)):
        entries = list(outbox)
        assert len(entries) == 1
        verify_outbox(entries, keys[i].public_key())
        record = entries[0].record
        assert watch.recorded_first == [True]
        assert record.payload_sha256 == result.payload_sha256
        assert record.payload_sha256 == hashlib.sha256(watch.sent).hexdigest()
        assert (record.round_id, record.base_version) == (result.round_id, 0)
        assert record.session_ids == (f"s{i}-a", f"s{i}-b")
        assert record.scrub_counts["email"] == i
        assert (record.noise_mode, record.noise_multiplier) == ("none", 0.0)
        assert record.norm_before_clip == pytest.approx(5.0 * weights[i])
        flat = np.concatenate([updates[i].delta[n].reshape(-1) for n in sorted(SHAPES)])
        assert record.norm_after_clip == pytest.approx(weights[i] * np.linalg.norm(flat),
                                                       rel=1e-5)
        outbox.close()

    # The published B: genesis is zero, FedAvg at rate 1 adds the weighted mean delta.
    models = models_pb2_grpc.ModelsStub(channels[0])
    chunks = models.Get(models_pb2.GetRequest(version=1, file=versions.ADAPTER_WEIGHTS),
                        timeout=5)
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / versions.ADAPTER_WEIGHTS).write_bytes(b"".join(c.data for c in chunks))
    _, b = versions.read_lora(folder / versions.ADAPTER_WEIGHTS)
    delta_code, weight_code = codec.payload_codes(done[0].round_config)
    total = sum(weights)
    e_d, e_w = delta_code.sum_error_bound(3), weight_code.sum_error_bound(3)
    bound = e_d / (total - e_w) + 0.3 * total * e_w / (total * (total - e_w)) + 1e-6
    for name in SHAPES:
        want = sum(w * u.delta[name] for w, u in zip(weights, updates, strict=True)) / total
        assert np.abs(b[name] - want).max() <= bound, name
    for channel in channels:
        channel.close()



def test_site_noise_is_added_and_recorded(aggregator, tmp_path) -> None:
    rng = np.random.default_rng(1)
    updates = [SiteUpdate(
        clip_norm=1.0, privacy_unit="session",
        delta={n: rng.uniform(-0.1, 0.1, s).astype(np.float32)
               for n, s in SHAPES.items()}, session_ids=(f"s{i}",))
               for i in range(3)]
    keys = [Ed25519PrivateKey.generate() for _ in updates]
    outboxes = [Outbox(tmp_path / f"site-{i}.sqlite", k) for i, k in enumerate(keys)]
    channels = [grpc.insecure_channel(aggregator.address) for _ in updates]
    done = run_sites(channels, keys, updates, outboxes, add_noise=True)
    assert {(r.version, r.cohort_size) for r in done} == {(1, 3)}
    for outbox, key, result in zip(outboxes, keys, done, strict=True):
        outbox.verify()
        (entry,) = list(outbox)
        verify_outbox([entry], key.public_key())
        record = entry.record
        assert (record.noise_mode, record.noise_multiplier) == ("distributed", 1.0)
        assert record.norm_before_clip == record.norm_after_clip  # nothing clipped upstream
        assert record.payload_sha256 == result.payload_sha256
        outbox.close()
    for channel in channels:
        channel.close()


@pytest.mark.parametrize("change, message", [
    ({"weight": 1.5}, "weight"), ({"weight": 0.0}, "weight"),
    ({"delta": {}}, "empty"), ({"delta": {"x": np.array([np.nan])}}, "non-finite"),
    ({"base_version": -1}, "base_version"), ({"norm_before_clip": -2.0}, "norm_before_clip"),
    ({"contributing_units": 0}, "contributing_units"),
    ({"privacy_unit": "household"}, "privacy_unit"), ({"clip_norm": 0.0}, "clip_norm"),
    ({"delta": {"x": np.array([3.0, 4.0], np.float32)}}, "not clipped as it says"),
    # A site is one unit however many sessions it summed.
    ({"delta": {"x": np.array([3.0, 4.0], np.float32)}, "privacy_unit": "site",
      "session_ids": ("a", "b", "c", "d", "e")}, "1 site"),
])
def test_site_updates_are_validated(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        SiteUpdate(**{"delta": {"x": np.zeros(2, np.float32)}, "clip_norm": 1.0, **change})


def test_an_update_against_an_older_version_sends_nothing_and_says_why(aggregator,
                                                                        tmp_path) -> None:
    from fleetmind.client.agent import StaleBaseError
    from fleetmind.server.versions import Release

    registry = aggregator.coordinator.registry
    _, b = registry.latest().tensors()
    registry.publish({n: t + 0.01 for n, t in b.items()},
                     Release(round_id=99, cohort_size=3, clip_norm=1.0, noise_multiplier=0.0,
                             noise_mode="central", epsilon=0.0, delta=1e-5))
    rng = np.random.default_rng(1)
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    outboxes = [Outbox(tmp_path / f"stale-{i}" / "outbox.sqlite", k) for i, k in enumerate(keys)]
    def run(i: int) -> None:
        update = SiteUpdate(clip_norm=1.0, privacy_unit="session",
            delta={n: rng.uniform(-0.15, 0.15, s).astype(np.float32) for n, s in SHAPES.items()},
            base_version=0, session_ids=(f"s{i}",), norm_before_clip=1.0)
        with grpc.insecure_channel(aggregator.address) as channel:
            participate(channel, keys[i], f"site-{i}", update, outboxes[i],
                        add_noise=False, timeout=10)

    errors = dict(enumerate(at_once(3, run)))
    assert all(isinstance(e, StaleBaseError) and "re-consolidate" in str(e)
               for e in errors.values())
    assert all(len(list(outbox)) == 0 for outbox in outboxes)  # nothing left the sites
    for outbox in outboxes:
        outbox.close()


def test_a_round_that_promises_more_than_the_clipping_kept_gets_nothing(tmp_path) -> None:
    from dataclasses import replace

    from fleetmind.client.agent import ClipMismatchError

    running = serve(ServerConfig(
        data_dir=tmp_path / "data", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=30, phase_deadline_s=30),
        privacy=replace(PRIVACY, privacy_unit="user"), adapter=SPEC))
    delta = {n: np.full(s, 0.01, np.float32) for n, s in SHAPES.items()}
    # Per session (a user's k sessions would move the sum by k x C); the whole site at the
    # full clip (removing one user moves a clipped site by up to 2C); unsaid. One cohort.
    refused = [{"privacy_unit": "session", "clip_norm": 1.0},
               {"privacy_unit": "site", "clip_norm": 1.0}, {"clip_norm": None}]
    kept = [{"privacy_unit": "user", "clip_norm": 1.0},
            {"privacy_unit": "site", "clip_norm": 0.5}, {"privacy_unit": "user", "clip_norm": 0.5}]
    keys = [Ed25519PrivateKey.generate() for _ in refused]
    outboxes = [Outbox(tmp_path / f"site-{i}" / "outbox.sqlite", k) for i, k in enumerate(keys)]

    def run(i: int) -> None:
        update = SiteUpdate(delta=delta, session_ids=(f"s{i}",), **refused[i])
        with grpc.insecure_channel(running.address) as channel:
            participate(channel, keys[i], f"site-{i}", update, outboxes[i], timeout=10)

    try:
        errors = dict(enumerate(at_once(len(refused), run)))
        assert all(isinstance(e, ClipMismatchError) and "each user moving the sum by at most 1"
                   in str(e) for e in errors.values()), errors
        assert "clipped each session to 1" in str(errors[0])
        assert "without saying how" in str(errors[2])
        assert all(len(list(outbox)) == 0 for outbox in outboxes)  # nothing left the sites
        # Reconfigured: the same unit at the same clip, or a coarser one at half of it.
        channels = [grpc.insecure_channel(running.address) for _ in kept]
        results = run_sites(channels, keys,
                            [SiteUpdate(delta=delta, session_ids=(f"s{i}",), **clipping)
                             for i, clipping in enumerate(kept)], outboxes, add_noise=False)
        assert {result.version for result in results} == {1}
        for channel in channels:
            channel.close()
    finally:
        running.stop(grace=None)
    for outbox in outboxes:
        outbox.close()


# ---- "was my vector summed?" from the outcome's fields -----------------------------------

P, D = fleet_pb2, fleet_pb2
SUMMED_TABLE = [
    # (phase, drop_reason, site_only) -> may a version still hold this site's vector?
    ((P.ROUND_PHASE_COHORT, D.DROP_REASON_COHORT_WAIT_EXPIRED, True), False),
    ((P.ROUND_PHASE_ADVERTISE_KEYS, D.DROP_REASON_MISSED_DEADLINE, True), False),
    ((P.ROUND_PHASE_SHARE_KEYS, D.DROP_REASON_MISSED_DEADLINE, True), False),
    ((P.ROUND_PHASE_MASKED_INPUT_COLLECTION, D.DROP_REASON_MISSED_DEADLINE, True), False),
    # It uploaded and then left: secure aggregation still sums its vector.
    ((P.ROUND_PHASE_UNMASKING, D.DROP_REASON_MISSED_DEADLINE, True), True),
    # The whole round ended: no version comes of it.
    ((P.ROUND_PHASE_ADVERTISE_KEYS, D.DROP_REASON_BELOW_MIN_COHORT, False), False),
    ((P.ROUND_PHASE_UNMASKING, D.DROP_REASON_TOO_FEW_SHARES, False), False),
    ((P.ROUND_PHASE_MERGE, D.DROP_REASON_UPDATE_REJECTED, False), False),
    ((P.ROUND_PHASE_SHARE_KEYS, D.DROP_REASON_ABANDONED_AT_RESTART, False), False),
    ((P.ROUND_PHASE_COHORT, D.DROP_REASON_QUEUE_REFUSED, False), False),
    # An aggregator from before the fields: only text, so the conservative answer.
    ((P.ROUND_PHASE_UNSPECIFIED, D.DROP_REASON_UNSPECIFIED, False), True),
    ((P.ROUND_PHASE_UNSPECIFIED, D.DROP_REASON_MISSED_DEADLINE, True), True),
]


@pytest.mark.parametrize(("fields", "summed"), SUMMED_TABLE)
def test_may_be_summed_decides_from_the_fields(fields, summed) -> None:
    phase, reason, site_only = fields
    aborted = fleet_pb2.RoundAborted(reason="site 4 missed share_keys and left round 1",
                                     retry=True, phase=phase, drop_reason=reason,
                                     site_only=site_only)
    assert may_be_summed(aborted) is summed


def test_round_aborted_error_carries_the_enums() -> None:
    aborted = fleet_pb2.RoundAborted(reason="x", retry=True,
                                     phase=P.ROUND_PHASE_SHARE_KEYS,
                                     drop_reason=D.DROP_REASON_MISSED_DEADLINE, site_only=True)
    error = RoundAbortedError.from_wire(7, aborted)
    assert (error.round_id, error.phase, error.drop_reason, error.site_only, error.retry) == (
        7, RoundPhase.SHARE_KEYS, DropReason.MISSED_DEADLINE, True, True)
    old = RoundAbortedError.from_wire(7, fleet_pb2.RoundAborted(reason="x", retry=True))
    assert (old.phase, old.drop_reason, old.site_only) == (None, None, False)
