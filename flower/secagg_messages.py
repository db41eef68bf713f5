"""fleetmind's SecAgg+ messages in Flower messages, both directions.

Each protocol message travels as its `fleetmind.v1` protobuf (the fleet wire's own codec,
`protos/secagg_codec.py`, so both transports decode and refuse alike), as bytes in the
message's "secagg" ConfigRecord; a masked vector travels as a uint32 array in an
ArrayRecord. Flower routes each message type "train.<action>" to the ClientApp function
registered for that action.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as Proto

from fleetmind.aggregation.secagg.messages import MaskedInput, ProtocolError

P = TypeVar("P", bound=Proto)

SECAGG = "secagg"
MASKED = "masked-input"
# The ClientApp actions of the four phases (Flower message type "train.<action>").
ADVERTISE_KEYS = "secagg_advertise_keys"
SHARE_KEYS = "secagg_share_keys"
MASKED_INPUT = "secagg_masked_input"
UNMASKING = "secagg_unmasking"
# The fields of a training exchange under secure aggregation: the round's encoding, sent
# with B (a fleet_pb2.RoundConfig without graph or identities), and the node's identity
# key, in its reply.
ENCODING = "encoding"
IDENTITY = "identity"
# Round 0's message: the round's config (graph, threshold, identities) and the site id it
# gives this node; then each phase's message and answer, by the field that holds it.
ROUND_CONFIG = "round-config"
SITE = "site"
ROUND_ID = "round-id"
ADVERTISEMENT = "advertisement"
ADVERTISED_KEYS = "advertised-keys"
ENCRYPTED_SHARES = "encrypted-shares"
SHARES_FOR_SITE = "shares-for-site"
UNMASK_REQUEST = "unmask-request"
UNMASK_SHARES = "unmask-shares"


def carry(fields: Mapping[str, Proto | bytes | int]) -> RecordDict:
    """A message content whose "secagg" record holds `fields` (protobufs serialised)."""
    return RecordDict({SECAGG: ConfigRecord({
        name: value.SerializeToString() if isinstance(value, Proto) else value
        for name, value in fields.items()})})


def read(content: RecordDict, name: str, kind: type[P]) -> P:
    """The protobuf `kind` in field `name` of the "secagg" record; ProtocolError
    ("malformed") if it is missing or does not parse."""
    value = read_bytes(content, name)
    try:
        return kind.FromString(value)
    except DecodeError as error:
        raise ProtocolError("malformed", f"secagg field {name!r}: {error}") from None


def read_bytes(content: RecordDict, name: str) -> bytes:
    value = _field(content, name)
    if not isinstance(value, bytes):
        raise ProtocolError("malformed", f"secagg field {name!r} must be bytes")
    return value


def read_int(content: RecordDict, name: str) -> int:
    value = _field(content, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("malformed", f"secagg field {name!r} must be a whole number")
    return value


def masked_input(message: MaskedInput) -> RecordDict:
    content = carry({ROUND_ID: message.round_id, SITE: message.site})
    content[MASKED] = ArrayRecord({"vector": Array(np.asarray(message.masked_vector))})
    return content


def read_masked_input(content: RecordDict) -> MaskedInput:
    """The MaskedInput a reply carries; ProtocolError if it is not one (MaskedInput
    itself refuses any vector that is not 1-D uint32)."""
    if MASKED not in content.array_records or "vector" not in content.array_records[MASKED]:
        raise ProtocolError("malformed", "no masked vector in the reply")
    vector = content.array_records[MASKED]["vector"].numpy()
    return MaskedInput(read_int(content, ROUND_ID), read_int(content, SITE), vector)


def _field(content: RecordDict, name: str) -> object:
    record = content.config_records.get(SECAGG)
    if record is None or name not in record:
        raise ProtocolError("malformed", f"no secagg field {name!r} in the message")
    return record[name]

