"""A site's side of fleetmind's SecAgg+ on Flower: the library's site states
(aggregation/secagg/site_r*.py) between Flower messages.

A ClientApp runs once per message, and on a SuperNode each run may be a new process, so
the state a phase leaves for the next (this round's X25519 keys, the self-mask seed, the
neighbours' shares) is kept in the node's `Context.state`, the one store Flower keeps per
node for a run (Flower's own SecAgg+ mod keeps its keys there too). It never leaves the
node; what leaves is what the library's states send, carried by `flower/secagg_messages.py`.

    start(context, ring)                      after training: keep the encoded update
    advertise(context, config wire, site id)  -> KeyAdvertisement        (round 0)
    share(context, AdvertisedKeys)            -> EncryptedShares          (round 1)
    mask(context, SharesForSite)              -> MaskedInput              (round 2)
    unmask(context, UnmaskRequest)            -> UnmaskShares             (round 3)
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fleetmind.aggregation.secagg import SiteAdvertiseKeys, crypto
from fleetmind.aggregation.secagg.messages import (
    AdvertisedKeys,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    Neighbourhood,
    ProtocolError,
    SharesForSite,
    UnmaskRequest,
    UnmaskShares,
)
from fleetmind.aggregation.secagg.site_r1_share_keys import SiteShareKeys
from fleetmind.aggregation.secagg.site_r2_masked_input import HeldShares
from fleetmind.aggregation.secagg.site_r3_unmasking import SiteUnmasking
from fleetmind.protos import secagg_codec as codec
from fleetmind.protos.fleetmind.v1 import fleet_pb2

# The node's Context.state keys: the run's identity, and the round in progress.
IDENTITY = "fleetmind-secagg-identity"
STATE = "fleetmind-secagg-round"
RING = "fleetmind-secagg-ring"


def identity(context: Context) -> Ed25519PrivateKey:
    """This node's Ed25519 identity for the run, made on first use. The ServerApp learns
    its public half from the training reply (there is no enrolment on Flower), so it
    binds advertisements to a node within a run, against an honest-but-curious server."""
    record = context.state.config_records.get(IDENTITY)
    if record is None:
        key = crypto.new_identity()
        context.state.config_records[IDENTITY] = ConfigRecord(
            {"private": key.private_bytes_raw()})
        return key
    return Ed25519PrivateKey.from_private_bytes(_bytes(record, "private"))


def start(context: Context, ring: np.ndarray) -> None:
    """Keeps the encoded update (ring words) until round 2 masks it; a new round's start
    forgets whatever an earlier round left."""
    context.state.config_records[STATE] = ConfigRecord()
    context.state.array_records[RING] = ArrayRecord({"ring": Array(ring)})


def advertise(context: Context, wire: fleet_pb2.RoundConfig, site: int) -> KeyAdvertisement:
    """Round 0: this round's keys, signed; ProtocolError if the config does not name this
    node's identity for `site`."""
    config = codec.round_config_from_wire(wire)
    try:  # the library's own checks: this site is in the cohort, under this identity
        state = SiteAdvertiseKeys(config, site, identity(context))
    except ValueError as error:
        raise ProtocolError("unknown_site", str(error)) from None
    if RING not in context.state.array_records:
        raise ProtocolError("wrong_round", "no encoded update: this node did not train "
                                           "this round")
    _once(context, "mask-key")
    _save(context, {"round-config": wire.SerializeToString(), "site": site,
                    "advertisement": codec.advertisement_to_wire(
                        state.advertisement).SerializeToString(),
                    "mask-key": crypto.agreement_private_bytes(state.keys.mask),
                    "share-key": crypto.agreement_private_bytes(state.keys.share)})
    return state.advertisement


def share(context: Context, keys: AdvertisedKeys) -> EncryptedShares:
    """Round 1: the library verifies the neighbours' signed keys and shares this site's
    secrets with them."""
    record = _state(context, "share-key")
    _once(context, "self-mask-seed")
    config, site = _config(record)
    advertising = SiteAdvertiseKeys.resume(
        config, site, _round_keys(record), codec.advertisement_from_wire(
            fleet_pb2.KeyAdvertisement.FromString(_bytes(record, "advertisement"))))
    sharing = advertising.receive(keys)
    _save(context, {"self-mask-seed": sharing.self_mask_seed,
                    "peers": codec.advertised_keys_to_wire(AdvertisedKeys(
                        config.round_id, tuple(sharing.peers.values()))).SerializeToString()})
    return sharing.encrypted_shares


def mask(context: Context, bundle: SharesForSite) -> MaskedInput:
    """Round 2: the encoded update, masked. The seed and the update are forgotten first,
    so the same masks never cover a second input."""
    record = _state(context, "self-mask-seed")
    config, site = _config(record)
    peers = codec.advertised_keys_from_wire(
        fleet_pb2.AdvertisedKeys.FromString(_bytes(record, "peers")))
    sharing = SiteShareKeys.resume(config, site, _round_keys(record),
                                   {ad.site: ad for ad in peers.advertisements},
                                   _bytes(record, "self-mask-seed"))
    ring = context.state.array_records.pop(RING)["ring"].numpy()
    for name in ("self-mask-seed", "mask-key", "share-key"):
        del record[name]
    masked, unmasking = sharing.receive(bundle).mask(ring)
    held = unmasking.held
    _save(context, {"held-owners": sorted(held),
                    "held-self-mask": [held[o].self_mask.to_bytes() for o in sorted(held)],
                    "held-mask-key": [held[o].mask_key.to_bytes() for o in sorted(held)]})
    return masked


def unmask(context: Context, request: UnmaskRequest) -> UnmaskShares:
    """Round 3: one kind of share per neighbour (the library's rule); the round's state is
    then dropped, so the request is answered once."""
    record = _state(context, "held-owners")
    config, site = _config(record)
    owners = _ints(record, "held-owners")
    held = {owner: HeldShares(crypto.Share.from_bytes(own), crypto.Share.from_bytes(key))
            for owner, own, key in zip(owners, _byte_list(record, "held-self-mask"),
                                       _byte_list(record, "held-mask-key"), strict=True)}
    context.state.config_records[STATE] = ConfigRecord()
    return SiteUnmasking(config, site, held).respond(request)


def _save(context: Context, values: dict) -> None:
    record = context.state.config_records.setdefault(STATE, ConfigRecord())
    for name, value in values.items():
        record[name] = value


def _once(context: Context, made: str) -> None:
    """ProtocolError("replay") if this phase already ran this round (it left `made`):
    keys or a seed made twice would be shared twice."""
    record = context.state.config_records.get(STATE)
    if record is not None and made in record:
        raise ProtocolError("replay", "this node already answered this phase of the round")


def _state(context: Context, needs: str) -> ConfigRecord:
    """The round's state, holding `needs`; ProtocolError if the phase before did not run
    here (a message out of order, or answered twice)."""
    record = context.state.config_records.get(STATE)
    if record is None or needs not in record:
        raise ProtocolError("wrong_round", f"this node holds no {needs} for this round: a "
                                           "phase came out of order or twice")
    return record


def _config(record: ConfigRecord) -> tuple[Neighbourhood, int]:
    wire = fleet_pb2.RoundConfig.FromString(_bytes(record, "round-config"))
    return codec.round_config_from_wire(wire), int(_ints(record, "site")[0])


def _round_keys(record: ConfigRecord) -> crypto.RoundKeys:
    return crypto.RoundKeys(crypto.agreement_key_from_bytes(_bytes(record, "mask-key")),
                            crypto.agreement_key_from_bytes(_bytes(record, "share-key")))


def _bytes(record: ConfigRecord, name: str) -> bytes:
    value = record[name]
    if not isinstance(value, bytes):
        raise ProtocolError("malformed", f"{name} must be bytes")
    return value


def _byte_list(record: ConfigRecord, name: str) -> list[bytes]:
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ProtocolError("malformed", f"{name} must be a list of bytes")
    return [v for v in value if isinstance(v, bytes)]


def _ints(record: ConfigRecord, name: str) -> list[int]:
    value = record[name]
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError("malformed", f"{name} must be whole numbers")
    return [int(v) for v in values if isinstance(v, int)]
