"""Whole rounds over real loopback gRPC: three sites, driven by the aggregation library's
site states and protos/secagg_codec, against `fleetmind.server.service.serve`.

Sites are stepped phase by phase from the test thread (a phase closes as soon as every
live site answered), so bad inputs can be slipped in mid-round and the round must still
finish with exactly the merge of the honest deltas: proof the refusals changed no state.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.secagg_rounds import (
    Site,
    bad_uploads,
    code,
    config,
    expected_b,
    four_site_config,
    quantisation_bound,
    reattach_after_restart,
    run_phases,
    run_round,
)

from fleetmind.aggregation.records import LedgerEntry as StoredEntry
from fleetmind.aggregation.records import verify_ledger
from fleetmind.aggregation.secagg import SiteAdvertiseKeys
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    fleet_pb2,
    models_pb2,
    models_pb2_grpc,
)
from fleetmind.server import versions
from fleetmind.server.config import PrivacyPolicy, ServerConfig
from fleetmind.server.service import serve


@pytest.fixture
def aggregator_config(tmp_path: Path) -> ServerConfig:
    """The config the shared `aggregator` fixture serves."""
    return config(tmp_path / "data")


def test_a_round_of_three_sites_publishes_the_librarys_merge(channel, tmp_path) -> None:
    sites = [Site(channel, f"site-{i}", seed=i) for i in range(3)]
    assert [s.id for s in sites] == [1, 2, 3]
    watch = models_pb2_grpc.ModelsStub(channel).Watch(
        models_pb2.WatchRequest(after_version=0), timeout=30)

    run_round(sites)
    done = [s.expect("completed").completed for s in sites]
    assert {(d.version, d.cohort_size, tuple(d.dropped)) for d in done} == {(1, 3, ())}

    # Watchers hear of version 1; its manifest verifies with the key from enrolment.
    announcement = next(iter(watch))
    assert announcement.version == 1
    watch.cancel()
    public = versions._public(sites[0].aggregator_key)
    public.verify(announcement.manifest_sig, announcement.manifest)
    manifest = versions.Manifest.from_bytes(announcement.manifest)
    assert (manifest.parent, manifest.cohort_size, manifest.round_id) == (0, 3, 1)

    # Download the weights in chunks, checking each chunk and the whole file.
    models = models_pb2_grpc.ModelsStub(channel)
    chunks = list(models.Get(models_pb2.GetRequest(
        version=1, file=versions.ADAPTER_WEIGHTS, max_chunk_bytes=100), timeout=5))
    assert len(chunks) > 1
    assert all(hashlib.sha256(c.data).digest() == c.chunk_sha256 for c in chunks)
    weights = b"".join(c.data for c in chunks)
    assert hashlib.sha256(weights).hexdigest() == manifest.files[versions.ADAPTER_WEIGHTS]
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / versions.ADAPTER_WEIGHTS).write_bytes(weights)
    _, b = versions.read_lora(folder / versions.ADAPTER_WEIGHTS)

    bound = quantisation_bound(sites[0], 3)
    for name, want in expected_b(sites).items():
        assert np.abs(b[name] - want).max() <= bound, name

    # The ledger: one signed entry that names the version, verified as an auditor would.
    audit = audit_pb2_grpc.AuditStub(channel)
    entries = list(audit.StreamLedger(audit_pb2.StreamLedgerRequest(), timeout=5))
    verify_ledger([StoredEntry(e.index, e.prev_hash, e.body, e.hash, e.signature)
                  for e in entries], sites[0].aggregator_key)
    record = StoredEntry(*(getattr(entries[0], f) for f in
                           ("index", "prev_hash", "body", "hash", "signature"))).record
    assert (record.round_id, record.cohort_size, record.dropouts, record.version) == (1, 3, 0, 1)
    assert record.version_hash == hashlib.sha256(announcement.manifest).hexdigest()
    budget = audit.Budget(audit_pb2.BudgetRequest(), timeout=5)
    assert budget.rounds == 1 and budget.participation_cap == 0  # no cap configured
    assert sites[0].wire_config.participation_cap == 0
    assert budget.epsilon_spent == pytest.approx(record.epsilon_total)
    assert 0 < budget.epsilon_spent <= budget.epsilon_budget


def test_bad_inputs_are_refused_with_their_status_and_change_nothing(aggregator, channel
                                                                      ) -> None:
    running = aggregator
    sites = [Site(channel, f"site-{i}", seed=10 + i) for i in range(3)]
    a, b, c = sites
    for s in sites:
        s.join()

    # Round 0: a retry is answered as before; a different advertisement is a replay.
    first = a.advertise()
    assert a.fleet.AdvertiseKeys(a.advertisement, timeout=5) == first
    other = SiteAdvertiseKeys(a.config, a.id, a.key)
    with pytest.raises(grpc.RpcError) as refused:
        a.fleet.AdvertiseKeys(codec.advertisement_to_wire(other.advertisement), timeout=5)
    assert code(refused.value) == grpc.StatusCode.ALREADY_EXISTS
    # Wrong round, a forged signature, a malformed key, an unenrolled site. Three sites
    # form the full graph, so b's view is a's with the two swapped.
    b_view = replace(a.config, site=b.id, neighbours=a.config.neighbours - {b.id} | {a.id})
    stale = codec.advertisement_to_wire(SiteAdvertiseKeys(b_view, b.id, b.key).advertisement)
    stale.round_id += 5
    forged = codec.advertisement_to_wire(SiteAdvertiseKeys(b_view, b.id, b.key).advertisement)
    forged.signature = bytes(64)
    short = codec.advertisement_to_wire(SiteAdvertiseKeys(b_view, b.id, b.key).advertisement)
    short.mask_key = b"\1" * 5
    stranger = fleet_pb2.KeyAdvertisement(round_id=a.round_id, site=99, mask_key=b"\1" * 32,
                                          share_key=b"\2" * 32, signature=bytes(64))
    for message, status in ((stale, grpc.StatusCode.FAILED_PRECONDITION),
                            (forged, grpc.StatusCode.UNAUTHENTICATED),
                            (short, grpc.StatusCode.INVALID_ARGUMENT),
                            (stranger, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as refused:
            b.fleet.AdvertiseKeys(message, timeout=5)
        assert code(refused.value) == status, message
    b.advertise()
    c.advertise()
    for s in sites:
        s.share()
    # After round 0 closed: the retry still gets its receipt; a late newcomer cannot enter.
    assert a.fleet.AdvertiseKeys(a.advertisement, timeout=5) == first

    # Round 2: torn, corrupted and oversized uploads; then the real one, retried.
    chunks = {s.id: s.masked_chunks() for s in sites}
    mine = chunks[a.id]
    for bad, status in bad_uploads(mine):
        with pytest.raises(grpc.RpcError) as refused:
            a.submit(bad)
        assert code(refused.value) == status
    receipt = a.submit(mine)
    assert a.submit(mine) == receipt  # the retry after a lost acknowledgement
    assert receipt.payload_sha256 == mine[0].payload_sha256
    b.submit(chunks[b.id])
    c.submit(chunks[c.id])

    for s in sites:
        s.unmask()
    with pytest.raises(grpc.RpcError) as refused:
        other_wire = fleet_pb2.UnmaskShares()
        other_wire.CopyFrom(a.unmask_wire)
        other_wire.self_mask_shares[0].y = b"\7" + bytes(32)
        a.fleet.Unmask(other_wire, timeout=5)
    assert code(refused.value) == grpc.StatusCode.ALREADY_EXISTS

    # Nothing the refusals carried reached the sum: the version is the honest merge.
    assert {s.expect("completed").completed.version for s in sites} == {1}
    _, merged = running.coordinator.registry.get(1).tensors()
    bound = quantisation_bound(a, 3)
    for name, want in expected_b(sites).items():
        assert np.abs(merged[name] - want).max() <= bound


def test_a_round_the_budget_cannot_pay_is_refused(tmp_path: Path) -> None:
    # One round of z=1 costs more than epsilon 1 at delta 1e-5: the budget refuses it.
    running = serve(config(tmp_path / "data", PrivacyPolicy(noise_multiplier=1.0,
                                                            epsilon_budget=1.0)))
    try:
        with grpc.insecure_channel(running.address) as channel:
            site = Site(channel, "site-0", seed=0)
            site.join()
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(site.stream))
            assert code(refused.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "privacy budget" in refused.value.details()
            budget = audit_pb2_grpc.AuditStub(channel).Budget(audit_pb2.BudgetRequest())
            assert (budget.rounds, budget.epsilon_spent) == (0, 0.0)
            assert running.coordinator.current_round() is None
    finally:
        running.stop(grace=None)


def test_a_round_in_flight_at_restart_is_abandoned_and_run_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = serve(config(data))
    channel = grpc.insecure_channel(running.address)
    sites = [Site(channel, f"site-{i}", seed=20 + i) for i in range(3)]
    for s in sites:
        s.join()
    for s in sites:
        s.advertise()
    channel.close()
    running.stop(grace=None)  # the aggregator goes away mid-round

    running = serve(config(data))
    try:
        with grpc.insecure_channel(running.address) as channel:
            reattach_after_restart(sites, channel)
            run_round(sites)
            assert {s.round_id for s in sites} == {2}
            assert {s.expect("completed").completed.version for s in sites} == {1}
        assert running.coordinator.ledger.head().record.round_id == 2
        assert running.coordinator.budget_status().rounds == 1
    finally:
        running.stop(grace=None)


def test_a_site_dropping_after_sharing_keys_leaves_the_others_merge(tmp_path: Path) -> None:
    running = serve(four_site_config(tmp_path))
    try:
        with grpc.insecure_channel(running.address) as channel:
            # Four sites: each survivor's self-mask seed is then held by two other survivors,
            # the threshold (with three, one dropout would leave a seed unrecoverable).
            sites = [Site(channel, f"site-{i}", seed=30 + i) for i in range(4)]
            run_phases(sites, last="share")
            survivors, gone = sites[:3], sites[3]
            # the fourth site vanishes: the phase closes at its deadline
            run_phases(survivors, first="upload")
            done = {(d.version, d.cohort_size, tuple(d.dropped))
                    for d in (s.expect("completed").completed for s in survivors)}
            assert done == {(1, 3, (gone.id,))}
            gone.expect("shares_for_site")  # what it never acted on
            aborted = gone.expect("aborted").aborted
            assert "missed" in aborted.reason
            # The outcome in fields: this site alone left, at the upload, past its deadline.
            assert (aborted.phase, aborted.drop_reason, aborted.site_only, aborted.retry) == (
                fleet_pb2.ROUND_PHASE_MASKED_INPUT_COLLECTION,
                fleet_pb2.DROP_REASON_MISSED_DEADLINE, True, True)
        _, merged = running.coordinator.registry.get(1).tensors()
        bound = quantisation_bound(survivors[0], 3)
        for name, want in expected_b(survivors).items():
            assert np.abs(merged[name] - want).max() <= bound
        assert running.coordinator.ledger.head().record.dropouts == 1
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize("phase", ["advertise", "share", "unmask"])
def test_a_site_dropping_in_any_other_phase_leaves_a_correct_merge(tmp_path: Path,
                                                                   phase: str) -> None:
    """The fourth site vanishes before `phase`; the survivors' round still publishes. A site
    that vanishes only at unmasking has already sent its masked input, which counts."""
    running = serve(four_site_config(tmp_path))
    try:
        with grpc.insecure_channel(running.address) as channel:
            sites = [Site(channel, f"site-{i}", seed=50 + i) for i in range(4)]
            survivors = sites[:3]
            for s in sites:
                s.join()
            for s in sites if phase != "advertise" else survivors:
                s.advertise()
            for s in sites if phase not in ("advertise", "share") else survivors:
                s.share()
            for s in sites if phase == "unmask" else survivors:
                s.submit(s.masked_chunks())
            for s in survivors:
                s.unmask()
            versions_done = {s.expect("completed").completed.version for s in survivors}
            assert versions_done == {1}
        contributors = sites if phase == "unmask" else survivors
        _, merged = running.coordinator.registry.get(1).tensors()
        bound = quantisation_bound(survivors[0], len(contributors))
        for name, want in expected_b(contributors).items():
            assert np.abs(merged[name] - want).max() <= bound
        # A site whose masked input arrived contributed, even if it missed the unmasking.
        expected_dropouts = 0 if phase == "unmask" else 1
        assert running.coordinator.ledger.head().record.dropouts == expected_dropouts
    finally:
        running.stop(grace=None)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 0.02)],
                         ids=["fresh", "stale-down-to-0.02"])
def test_honest_noisy_rounds_pass_the_aggregate_check(aggregator, channel, weights) -> None:
    """The check before signing (coordinator._check_aggregate) must never refuse what honest
    sites send: full distributed noise, clipped deltas, staleness weights down to near
    min_site_weight. Three rounds each, so a rare noise draw would show."""
    running = aggregator
    sites = [Site(channel, f"site-{i}", seed=40 + i) for i in range(3)]
    for s, w in zip(sites, weights, strict=True):
        s.noise, s.weight = True, w
    for round_number in range(1, 4):
        run_round(sites)
        assert {s.expect("completed").completed.version for s in sites} == {round_number}
    assert running.coordinator.rejected() == []


def test_a_participation_cap_reaches_sites_and_the_budget_rpc(tmp_path: Path) -> None:
    capped = PrivacyPolicy(clip_norm=1.0, noise_multiplier=4.0, epsilon_budget=10.0,
                           fixed_point_clip=1.0, participation_cap=4)
    running = serve(config(tmp_path / "data", capped))
    try:
        with grpc.insecure_channel(running.address) as channel:
            sites = [Site(channel, f"site-{i}", seed=60 + i) for i in range(3)]
            run_round(sites)
            assert {s.expect("completed").completed.version for s in sites} == {1}
            assert {s.wire_config.participation_cap for s in sites} == {4}
            budget = audit_pb2_grpc.AuditStub(channel).Budget(audit_pb2.BudgetRequest(),
                                                              timeout=5)
            assert (budget.participation_cap, budget.rounds) == (4, 1)
    finally:
        running.stop(grace=None)
