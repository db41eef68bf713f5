"""The secure-aggregation messages of `fleetmind.aggregation.secagg` to and from their
`fleetmind.v1` carriers, field for field; both the site and the aggregator use it.

A mapping, not behaviour: the protocol's rules stay in the state machines. Decoding
refuses what cannot be a protocol message (wrong sizes, values outside their range, torn
chunk streams) with `ProtocolError("malformed", ...)`, which the services answer with
INVALID_ARGUMENT before any state changes; the message dataclasses check the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from fleetmind.aggregation.encoding import encoding_codes
from fleetmind.aggregation.quantize import FixedPoint
from fleetmind.aggregation.secagg import crypto
from fleetmind.aggregation.secagg.messages import (
    AdvertisedKeys,
    DropReason,
    EncryptedShare,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    Neighbourhood,
    ProtocolError,
    RoundConfig,
    RoundPhase,
    SharesForSite,
    UnmaskRequest,
    UnmaskShares,
    pack_ring,
    unpack_ring,
)
from fleetmind.protos.fleetmind.v1 import fleet_pb2

# 1 MiB chunks stay well under gRPC's default 4 MiB message limit, with room for headers.
DEFAULT_CHUNK_BYTES = 1 << 20
SIGNATURE_BYTES = 64
MAX_CIPHERTEXT_BYTES = 4096  # two shares plus AES-GCM overhead are ~100 bytes


def _malformed(message: str) -> ProtocolError:
    return ProtocolError("malformed", message)


def _site(value: int, what: str) -> int:
    if value < 1:
        raise _malformed(f"{what}={value}: site ids start at 1")
    return value


def round_config_to_wire(config: RoundConfig, site: int) -> fleet_pb2.RoundConfig:
    """The protocol part of a round's config as `site` is told it (its neighbourhood, not
    the cohort's graph); the caller fills the encoding and privacy fields (base_version,
    clip_norm, ...)."""
    view = config.neighbourhood(site)
    wire = fleet_pb2.RoundConfig(round_id=view.round_id, threshold=view.threshold,
                                 min_cohort=view.min_cohort, cohort_size=view.cohort_size,
                                 vector_length=view.vector_length, ring_bits=view.ring_bits)
    wire.graph[site].sites.extend(sorted(view.neighbours))
    for peer, key in view.identities.items():
        wire.identities[peer] = key
    return wire


def round_config_from_wire(wire: fleet_pb2.RoundConfig) -> Neighbourhood:
    """The receiving site's view of the round; its one graph entry names the site."""
    if len(wire.graph) != 1:
        raise _malformed(f"round config names {len(wire.graph)} sites' neighbours; a site is "
                         "sent its own neighbourhood only")
    for site, key in wire.identities.items():
        if len(key) != crypto.PUBLIC_KEY_BYTES:
            raise _malformed(f"identity of site {site} has {len(key)} bytes, "
                             f"need {crypto.PUBLIC_KEY_BYTES}")
    (site, peers), = wire.graph.items()
    try:
        return Neighbourhood(wire.round_id, site, frozenset(peers.sites), wire.threshold,
                             wire.min_cohort, wire.cohort_size, wire.vector_length,
                             wire.ring_bits, dict(wire.identities))
    except ValueError as error:
        raise _malformed(f"round config: {error}") from None


def payload_codes(wire: fleet_pb2.RoundConfig) -> tuple[FixedPoint, FixedPoint]:
    """`aggregation.encoding.encoding_codes` of a round's wire config: site and aggregator
    derive the codes from the same fields, so they cannot disagree."""
    try:
        return encoding_codes(wire.clip_norm, wire.noise_multiplier, wire.noise_mode,
                              wire.privacy_unit, wire.expected_cohort, wire.fixed_point_clip,
                              wire.cohort_max, wire.ring_bits)
    except ValueError as error:
        raise _malformed(f"round config encoding: {error}") from None


def advertisement_to_wire(ad: KeyAdvertisement) -> fleet_pb2.KeyAdvertisement:
    return fleet_pb2.KeyAdvertisement(round_id=ad.round_id, site=ad.site, mask_key=ad.mask_key,
                                      share_key=ad.share_key, signature=ad.signature)


def advertisement_from_wire(wire: fleet_pb2.KeyAdvertisement) -> KeyAdvertisement:
    if len(wire.signature) != SIGNATURE_BYTES:
        raise _malformed(f"site {wire.site}: signature has {len(wire.signature)} bytes, "
                         f"need {SIGNATURE_BYTES}")
    return KeyAdvertisement(wire.round_id, _site(wire.site, "site"), wire.mask_key,
                            wire.share_key, wire.signature)


def advertised_keys_to_wire(keys: AdvertisedKeys) -> fleet_pb2.AdvertisedKeys:
    return fleet_pb2.AdvertisedKeys(
        round_id=keys.round_id,
        advertisements=[advertisement_to_wire(ad) for ad in keys.advertisements])


def advertised_keys_from_wire(wire: fleet_pb2.AdvertisedKeys) -> AdvertisedKeys:
    return AdvertisedKeys(wire.round_id,
                          tuple(advertisement_from_wire(ad) for ad in wire.advertisements))


def _share_to_wire(share: EncryptedShare) -> fleet_pb2.EncryptedShare:
    return fleet_pb2.EncryptedShare(sender=share.sender, recipient=share.recipient,
                                    ciphertext=share.ciphertext)


def _share_from_wire(wire: fleet_pb2.EncryptedShare) -> EncryptedShare:
    if not 0 < len(wire.ciphertext) <= MAX_CIPHERTEXT_BYTES:
        raise _malformed(f"share {wire.sender}->{wire.recipient}: ciphertext has "
                         f"{len(wire.ciphertext)} bytes, need 1..{MAX_CIPHERTEXT_BYTES}")
    return EncryptedShare(_site(wire.sender, "sender"), _site(wire.recipient, "recipient"),
                          wire.ciphertext)


def encrypted_shares_to_wire(message: EncryptedShares) -> fleet_pb2.EncryptedShares:
    return fleet_pb2.EncryptedShares(round_id=message.round_id, sender=message.sender,
                                     shares=[_share_to_wire(s) for s in message.shares])


def encrypted_shares_from_wire(wire: fleet_pb2.EncryptedShares) -> EncryptedShares:
    return EncryptedShares(wire.round_id, _site(wire.sender, "sender"),
                           tuple(_share_from_wire(s) for s in wire.shares))


def shares_for_site_to_wire(message: SharesForSite) -> fleet_pb2.SharesForSite:
    return fleet_pb2.SharesForSite(round_id=message.round_id, recipient=message.recipient,
                                   shares=[_share_to_wire(s) for s in message.shares])


def shares_for_site_from_wire(wire: fleet_pb2.SharesForSite) -> SharesForSite:
    return SharesForSite(wire.round_id, _site(wire.recipient, "recipient"),
                         tuple(_share_from_wire(s) for s in wire.shares))


def masked_input_to_chunks(message: MaskedInput, ring_bits: int,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES
                           ) -> Iterator[fleet_pb2.MaskedVectorChunk]:
    """The masked vector packed to `ring_bits` words, in order, each chunk carrying the
    header; at least one chunk, so an empty stream is never a valid upload."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be >= 1")
    payload = pack_ring(message.masked_vector, ring_bits)
    digest = hashlib.sha256(payload).digest()
    for offset in range(0, max(len(payload), 1), chunk_bytes):
        yield fleet_pb2.MaskedVectorChunk(
            round_id=message.round_id, site=message.site, ring_bits=ring_bits,
            total_bytes=len(payload), payload_sha256=digest, offset=offset,
            data=payload[offset:offset + chunk_bytes])


def masked_input_from_chunks(chunks: Iterable[fleet_pb2.MaskedVectorChunk],
                             max_bytes: int) -> tuple[MaskedInput, bytes]:
    """Reassembles an upload held in memory: the MaskedInput and its payload sha256.
    Refuses a header that changes mid-stream, a gap or overlap, more than `max_bytes`
    (announced or sent), or a payload whose hash is not the announced one."""
    first = None
    parts: list[bytes] = []
    received = 0
    for chunk in chunks:
        if first is None:
            first = chunk
            if chunk.total_bytes > max_bytes:
                raise _malformed(f"site {chunk.site}: upload of {chunk.total_bytes} bytes "
                                 f"exceeds the {max_bytes}-byte limit")
            if len(chunk.payload_sha256) != 32:
                raise _malformed(f"site {chunk.site}: payload_sha256 must be 32 bytes")
        header = (chunk.round_id, chunk.site, chunk.ring_bits, chunk.total_bytes,
                  chunk.payload_sha256)
        if header != (first.round_id, first.site, first.ring_bits, first.total_bytes,
                      first.payload_sha256):
            raise _malformed(f"site {first.site}: chunk header changed mid-stream at offset "
                             f"{chunk.offset}")
        if chunk.offset != received:
            raise _malformed(f"site {first.site}: chunk at offset {chunk.offset}, expected "
                             f"{received} (chunks must arrive in order, without gaps)")
        received += len(chunk.data)
        if received > first.total_bytes:
            raise _malformed(f"site {first.site}: {received} bytes sent, "
                             f"{first.total_bytes} announced")
        parts.append(chunk.data)
    if first is None:
        raise _malformed("empty upload: no chunks")
    if received != first.total_bytes:
        raise _malformed(f"site {first.site}: upload ended at {received} of "
                         f"{first.total_bytes} bytes")
    payload = b"".join(parts)
    digest = hashlib.sha256(payload).digest()
    if digest != first.payload_sha256:
        raise _malformed(f"site {first.site}: payload sha256 does not match the announced "
                         "one; the upload was corrupted, send it again")
    if first.ring_bits not in (16, 24, 32):
        raise _malformed(f"site {first.site}: ring_bits={first.ring_bits}")
    vector = unpack_ring(payload, first.ring_bits)
    return MaskedInput(first.round_id, _site(first.site, "site"), vector), digest


def unmask_request_to_wire(request: UnmaskRequest) -> fleet_pb2.UnmaskRequest:
    return fleet_pb2.UnmaskRequest(round_id=request.round_id,
                                   survivors=sorted(request.survivors),
                                   dropped=sorted(request.dropped))


def unmask_request_from_wire(wire: fleet_pb2.UnmaskRequest) -> UnmaskRequest:
    survivors, dropped = frozenset(wire.survivors), frozenset(wire.dropped)
    if len(survivors) != len(wire.survivors) or len(dropped) != len(wire.dropped):
        raise _malformed("unmask request lists a site twice")
    if survivors & dropped:
        raise _malformed(f"sites {sorted(survivors & dropped)} both survived and dropped")
    return UnmaskRequest(wire.round_id, survivors, dropped)


def _shamir_to_wire(owner: int, share: crypto.Share) -> fleet_pb2.ShamirShare:
    return fleet_pb2.ShamirShare(owner=owner, x=share.x,
                                 y=share.to_bytes()[4:])  # to_bytes is x (4 bytes) then y


def _shamir_from_wire(wires: Iterable[fleet_pb2.ShamirShare], site: int
                      ) -> dict[int, crypto.Share]:
    shares: dict[int, crypto.Share] = {}
    for wire in wires:
        if wire.owner in shares:
            raise _malformed(f"site {site} sent two shares of site {wire.owner}")
        if len(wire.y) != crypto.SHARE_VALUE_BYTES:
            raise _malformed(f"share of site {wire.owner}: y has {len(wire.y)} bytes, need "
                             f"{crypto.SHARE_VALUE_BYTES}")
        try:
            shares[_site(wire.owner, "owner")] = crypto.Share(wire.x,
                                                              int.from_bytes(wire.y, "little"))
        except crypto.CryptoError as error:
            raise _malformed(f"share of site {wire.owner}: {error}") from None
    return shares


def unmask_shares_to_wire(message: UnmaskShares) -> fleet_pb2.UnmaskShares:
    return fleet_pb2.UnmaskShares(
        round_id=message.round_id, site=message.site,
        self_mask_shares=[_shamir_to_wire(o, s)
                          for o, s in sorted(message.self_mask_shares.items())],
        mask_key_shares=[_shamir_to_wire(o, s)
                         for o, s in sorted(message.mask_key_shares.items())])


def unmask_shares_from_wire(wire: fleet_pb2.UnmaskShares) -> UnmaskShares:
    site = _site(wire.site, "site")
    return UnmaskShares(wire.round_id, site, _shamir_from_wire(wire.self_mask_shares, site),
                        _shamir_from_wire(wire.mask_key_shares, site))


# ---- round outcomes: the protocol's enums <-> the wire's -----------------------------
# By name: DropReason.X <-> DROP_REASON_X, RoundPhase.X <-> ROUND_PHASE_X. A value this
# side does not know (a newer peer) or UNSPECIFIED (an older one) decodes to None.


def drop_reason_to_wire(reason: DropReason) -> int:
    return int(fleet_pb2.DropReason.Value(f"DROP_REASON_{reason.name}"))


def drop_reason_from_wire(value: int) -> DropReason | None:
    name = fleet_pb2.DropReason.Name(value) if value in fleet_pb2.DropReason.values() else ""
    return DropReason.__members__.get(name.removeprefix("DROP_REASON_"))


def round_phase_to_wire(phase: RoundPhase | str) -> int:
    return int(fleet_pb2.RoundPhase.Value(f"ROUND_PHASE_{RoundPhase(phase).name}"))


def round_phase_from_wire(value: int) -> RoundPhase | None:
    name = fleet_pb2.RoundPhase.Name(value) if value in fleet_pb2.RoundPhase.values() else ""
    return RoundPhase.__members__.get(name.removeprefix("ROUND_PHASE_"))
