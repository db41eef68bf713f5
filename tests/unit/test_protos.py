"""The wire contract: committed stubs match the protos, import inside the package, and
carry every secure-aggregation message without loss (a whole round through protobuf bytes)."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.secagg import (
    NeighbourGraph,
    ProtocolError,
    RoundConfig,
    ServerAdvertiseKeys,
    ServerCompleted,
    SiteAdvertiseKeys,
    crypto,
)
from fleetmind.aggregation.secagg.messages import MaskedInput
from fleetmind.protos import regenerate
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import audit_pb2, fleet_pb2, models_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_a_fresh_generation() -> None:
    assert regenerate.differences() == []


def test_check_reports_a_stale_stub(tmp_path: Path) -> None:
    # A copy of the protos folder with one proto changed: --check's comparison must see it.
    (tmp_path / "fleetmind" / "v1").mkdir(parents=True)
    for path in (ROOT / "protos" / "fleetmind" / "v1").iterdir():
        if path.suffix in (".proto", ".py", ".pyi"):
            (tmp_path / "fleetmind" / "v1" / path.name).write_bytes(path.read_bytes())
    audit = tmp_path / "fleetmind" / "v1" / "audit.proto"
    audit.write_text(audit.read_text().replace("string accountant = 5;",
                                               "string accountant = 5;\n  bool spare = 99;"))
    assert regenerate.differences(tmp_path) == [
        "audit_pb2.py: differs from its .proto, run python -m fleetmind.protos.regenerate",
        "audit_pb2.pyi: differs from its .proto, run python -m fleetmind.protos.regenerate"]


def test_services_have_the_designed_methods() -> None:
    def methods(module, service):
        found = module.DESCRIPTOR.services_by_name[service].methods
        return {m.name: (m.client_streaming, m.server_streaming) for m in found}

    assert methods(fleet_pb2, "Fleet") == {
        "Enroll": (False, False), "JoinRound": (False, True), "AdvertiseKeys": (False, False),
        "ShareKeys": (False, False), "SubmitMaskedVector": (True, False),
        "Unmask": (False, False)}
    assert methods(models_pb2, "Models") == {
        "Watch": (False, True), "Get": (False, True), "Latest": (False, False)}
    assert methods(audit_pb2, "Audit") == {
        "StreamLedger": (False, True), "Budget": (False, False)}


def test_every_round_request_names_its_round_and_site() -> None:
    for name in ("JoinRoundRequest", "KeyAdvertisement", "EncryptedShares",
                 "MaskedVectorChunk", "UnmaskShares"):
        fields = set(fleet_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name)
        assert "round_id" in fields, name
        assert fields & {"site", "sender"}, name


def _wire(message):
    """Through protobuf bytes, as the network would carry it."""
    return type(message).FromString(message.SerializeToString())


def test_a_round_survives_the_wire_with_a_dropout() -> None:
    sites = [1, 2, 3, 4]
    identities = {s: crypto.new_identity() for s in sites}
    graph = NeighbourGraph.full(sites)
    config = RoundConfig(5, graph, 2, 2, 33, 24,
                         {s: crypto.identity_public_bytes(k) for s, k in identities.items()})
    views = {s: codec.round_config_from_wire(_wire(codec.round_config_to_wire(config, s)))
             for s in sites}
    assert views[2] == config.neighbourhood(2)
    code = FixedPoint(clip=1.0, cohort_max=4, ring_bits=24)
    rng = np.random.default_rng(0)
    values = {s: rng.uniform(-1, 1, 33) for s in sites}
    server = ServerAdvertiseKeys(config)
    site_states = {s: SiteAdvertiseKeys(views[s], s, identities[s]) for s in sites}
    for state in site_states.values():
        server.receive(codec.advertisement_from_wire(
            _wire(codec.advertisement_to_wire(state.advertisement))))
    server = server.close()
    for s in sites:
        keys = codec.advertised_keys_from_wire(
            _wire(codec.advertised_keys_to_wire(server.to_sites[s])))
        site_states[s] = site_states[s].receive(keys)
        server.receive(codec.encrypted_shares_from_wire(
            _wire(codec.encrypted_shares_to_wire(site_states[s].encrypted_shares))))
    server = server.close()
    unmasking = {}
    for s in sites[:-1]:  # site 4 drops after sharing its keys
        bundle = codec.shares_for_site_from_wire(
            _wire(codec.shares_for_site_to_wire(server.to_sites[s])))
        masked, unmasking[s] = site_states[s].receive(bundle).mask(code.encode(values[s], rng))
        chunks = [_wire(c) for c in codec.masked_input_to_chunks(masked, 24, chunk_bytes=10)]
        assert len(chunks) == 10  # 33 words x 3 bytes
        received, digest = codec.masked_input_from_chunks(chunks, max_bytes=1000)
        assert digest == hashlib.sha256(b"".join(c.data for c in chunks)).digest()
        server.receive(received)
    server = server.close()
    request = codec.unmask_request_from_wire(
        _wire(codec.unmask_request_to_wire(server.request)))
    assert request.dropped == {4}
    for s in sites[:-1]:
        server.receive(codec.unmask_shares_from_wire(
            _wire(codec.unmask_shares_to_wire(unmasking[s].respond(request)))))
    result = server.close()
    assert isinstance(result, ServerCompleted)
    decoded = code.decode_sum(result.cohort_sum)
    expected = sum(values[s] for s in sites[:-1])
    assert np.abs(decoded - expected).max() <= code.sum_error_bound(3)


def _upload(words: int = 20, chunk_bytes: int = 16):
    vector = np.arange(words, dtype=np.uint32)
    return list(codec.masked_input_to_chunks(MaskedInput(3, 2, vector), 32, chunk_bytes))


@pytest.mark.parametrize("tamper, message", [
    (lambda cs: cs[1:], "expected 0"),
    (lambda cs: [cs[0], cs[2], cs[1], *cs[3:]], "expected 16"),
    (lambda cs: cs[:-1], "ended at 64 of 80"),
    (lambda cs: [*cs[:2], fleet_pb2.MaskedVectorChunk(**{**_fields(cs[2]), "site": 9}),
                 *cs[3:]], "header changed"),
    (lambda cs: [*cs[:-1], fleet_pb2.MaskedVectorChunk(**{**_fields(cs[-1]),
                                                          "data": b"\0" * 16})], "sha256"),
    (lambda cs: [*cs, fleet_pb2.MaskedVectorChunk(**{**_fields(cs[-1]), "offset": 80})],
     "96 bytes sent, 80 announced"),
    (lambda cs: [], "no chunks"),
])
def test_torn_uploads_are_refused(tamper, message) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        codec.masked_input_from_chunks(tamper(_upload()), max_bytes=1000)
    assert caught.value.kind == "malformed"


def _fields(chunk: fleet_pb2.MaskedVectorChunk) -> dict:
    return {field.name: value for field, value in chunk.ListFields()}


def test_an_oversized_upload_is_refused_at_its_first_chunk() -> None:
    with pytest.raises(ProtocolError, match="exceeds the 40-byte limit"):
        codec.masked_input_from_chunks(_upload(), max_bytes=40)


def test_malformed_fields_are_refused_before_the_protocol_sees_them() -> None:
    bad = fleet_pb2.KeyAdvertisement(round_id=1, site=1, mask_key=b"a" * 32,
                                     share_key=b"b" * 32, signature=b"short")
    with pytest.raises(ProtocolError, match="signature has 5 bytes"):
        codec.advertisement_from_wire(bad)
    with pytest.raises(ProtocolError, match="site ids start at 1"):
        codec.advertisement_from_wire(fleet_pb2.KeyAdvertisement(
            round_id=1, site=0, mask_key=b"a" * 32, share_key=b"b" * 32, signature=b"s" * 64))
    share = fleet_pb2.ShamirShare(owner=2, x=1, y=b"\xff" * 33)  # beyond the prime
    with pytest.raises(ProtocolError, match="outside the field"):
        codec.unmask_shares_from_wire(fleet_pb2.UnmaskShares(round_id=1, site=1,
                                                             self_mask_shares=[share]))
    with pytest.raises(ProtocolError, match="both survived and dropped"):
        codec.unmask_request_from_wire(fleet_pb2.UnmaskRequest(round_id=1, survivors=[1, 2],
                                                               dropped=[2]))
    with pytest.raises(ProtocolError, match="names 0 sites' neighbours"):
        codec.round_config_from_wire(fleet_pb2.RoundConfig(round_id=1, threshold=2,
                                                           min_cohort=2, vector_length=4,
                                                           ring_bits=32))
    lonely = fleet_pb2.RoundConfig(round_id=1, threshold=2, min_cohort=2, cohort_size=3,
                                   vector_length=4, ring_bits=32)
    lonely.graph[1].sites.extend([2, 3])
    lonely.identities[1] = b"k" * 32
    lonely.identities[2] = b"k" * 32
    with pytest.raises(ProtocolError, match="identities must name the site and its "
                                            "neighbours exactly"):
        codec.round_config_from_wire(lonely)
    lonely.identities[3] = b"k" * 32
    lonely.cohort_size = 2
    with pytest.raises(ProtocolError, match="cohort_size=2 must exceed"):
        codec.round_config_from_wire(lonely)


def test_outcome_enums_map_one_to_one_onto_the_wire() -> None:
    """Every protocol DropReason and RoundPhase has its wire value and back; UNSPECIFIED
    (an older peer) and a value this side does not know (a newer one) decode to None."""
    from fleetmind.aggregation.secagg import DropReason, RoundPhase
    from fleetmind.protos import secagg_codec as codec
    from fleetmind.protos.fleetmind.v1 import fleet_pb2

    for reason in DropReason:
        assert codec.drop_reason_from_wire(codec.drop_reason_to_wire(reason)) is reason
    for phase in RoundPhase:
        assert codec.round_phase_from_wire(codec.round_phase_to_wire(phase)) is phase
    assert len(fleet_pb2.DropReason.values()) == len(DropReason) + 1
    assert len(fleet_pb2.RoundPhase.values()) == len(RoundPhase) + 1
    for unknown in (0, 999):
        assert codec.drop_reason_from_wire(unknown) is None
        assert codec.round_phase_from_wire(unknown) is None
