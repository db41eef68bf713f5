from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_PHASE_UNSPECIFIED: _ClassVar[RoundPhase]
    ROUND_PHASE_COHORT: _ClassVar[RoundPhase]
    ROUND_PHASE_ADVERTISE_KEYS: _ClassVar[RoundPhase]
    ROUND_PHASE_SHARE_KEYS: _ClassVar[RoundPhase]
    ROUND_PHASE_MASKED_INPUT_COLLECTION: _ClassVar[RoundPhase]
    ROUND_PHASE_UNMASKING: _ClassVar[RoundPhase]
    ROUND_PHASE_MERGE: _ClassVar[RoundPhase]

class DropReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DROP_REASON_UNSPECIFIED: _ClassVar[DropReason]
    DROP_REASON_MISSED_DEADLINE: _ClassVar[DropReason]
    DROP_REASON_BELOW_MIN_COHORT: _ClassVar[DropReason]
    DROP_REASON_TOO_FEW_SHARES: _ClassVar[DropReason]
    DROP_REASON_MASKS_NOT_REMOVABLE: _ClassVar[DropReason]
    DROP_REASON_UPDATE_REJECTED: _ClassVar[DropReason]
    DROP_REASON_MERGE_FAILED: _ClassVar[DropReason]
    DROP_REASON_ABANDONED_AT_RESTART: _ClassVar[DropReason]
    DROP_REASON_QUEUE_REFUSED: _ClassVar[DropReason]
    DROP_REASON_COHORT_WAIT_EXPIRED: _ClassVar[DropReason]
ROUND_PHASE_UNSPECIFIED: RoundPhase
ROUND_PHASE_COHORT: RoundPhase
ROUND_PHASE_ADVERTISE_KEYS: RoundPhase
ROUND_PHASE_SHARE_KEYS: RoundPhase
ROUND_PHASE_MASKED_INPUT_COLLECTION: RoundPhase
ROUND_PHASE_UNMASKING: RoundPhase
ROUND_PHASE_MERGE: RoundPhase
DROP_REASON_UNSPECIFIED: DropReason
DROP_REASON_MISSED_DEADLINE: DropReason
DROP_REASON_BELOW_MIN_COHORT: DropReason
DROP_REASON_TOO_FEW_SHARES: DropReason
DROP_REASON_MASKS_NOT_REMOVABLE: DropReason
DROP_REASON_UPDATE_REJECTED: DropReason
DROP_REASON_MERGE_FAILED: DropReason
DROP_REASON_ABANDONED_AT_RESTART: DropReason
DROP_REASON_QUEUE_REFUSED: DropReason
DROP_REASON_COHORT_WAIT_EXPIRED: DropReason

class EnrollRequest(_message.Message):
    __slots__ = ("site_name", "identity_key", "proof")
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    site_name: str
    identity_key: bytes
    proof: bytes
    def __init__(self, site_name: _Optional[str] = ..., identity_key: _Optional[bytes] = ..., proof: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("site", "aggregator_key", "latest_version")
    SITE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_KEY_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    site: int
    aggregator_key: bytes
    latest_version: int
    def __init__(self, site: _Optional[int] = ..., aggregator_key: _Optional[bytes] = ..., latest_version: _Optional[int] = ...) -> None: ...

class JoinRoundRequest(_message.Message):
    __slots__ = ("site", "round_id", "base_version", "contributing_units")
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTING_UNITS_FIELD_NUMBER: _ClassVar[int]
    site: int
    round_id: int
    base_version: int
    contributing_units: int
    def __init__(self, site: _Optional[int] = ..., round_id: _Optional[int] = ..., base_version: _Optional[int] = ..., contributing_units: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("round_id", "waiting", "config", "advertised_keys", "shares_for_site", "unmask_request", "completed", "aborted")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ADVERTISED_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FOR_SITE_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    waiting: Waiting
    config: RoundConfig
    advertised_keys: AdvertisedKeys
    shares_for_site: SharesForSite
    unmask_request: UnmaskRequest
    completed: RoundCompleted
    aborted: RoundAborted
    def __init__(self, round_id: _Optional[int] = ..., waiting: _Optional[_Union[Waiting, _Mapping]] = ..., config: _Optional[_Union[RoundConfig, _Mapping]] = ..., advertised_keys: _Optional[_Union[AdvertisedKeys, _Mapping]] = ..., shares_for_site: _Optional[_Union[SharesForSite, _Mapping]] = ..., unmask_request: _Optional[_Union[UnmaskRequest, _Mapping]] = ..., completed: _Optional[_Union[RoundCompleted, _Mapping]] = ..., aborted: _Optional[_Union[RoundAborted, _Mapping]] = ...) -> None: ...

class Waiting(_message.Message):
    __slots__ = ("ready_sites", "target_cohort", "deadline_unix_ms")
    READY_SITES_FIELD_NUMBER: _ClassVar[int]
    TARGET_COHORT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ready_sites: int
    target_cohort: int
    deadline_unix_ms: int
    def __init__(self, ready_sites: _Optional[int] = ..., target_cohort: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class Neighbours(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sites: _Optional[_Iterable[int]] = ...) -> None: ...

class RoundConfig(_message.Message):
    __slots__ = ("round_id", "graph", "threshold", "min_cohort", "vector_length", "ring_bits", "identities", "base_version", "clip_norm", "noise_multiplier", "noise_mode", "privacy_unit", "expected_cohort", "fixed_point_clip", "cohort_max", "phase_deadline_unix_ms", "plain_sum", "participation_cap", "cohort_size")
    class GraphEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: Neighbours
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[Neighbours, _Mapping]] = ...) -> None: ...
    class IdentitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_COHORT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    NOISE_MODE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_UNIT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COHORT_FIELD_NUMBER: _ClassVar[int]
    FIXED_POINT_CLIP_FIELD_NUMBER: _ClassVar[int]
    COHORT_MAX_FIELD_NUMBER: _ClassVar[int]
    PHASE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PLAIN_SUM_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_CAP_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    graph: _containers.MessageMap[int, Neighbours]
    threshold: int
    min_cohort: int
    vector_length: int
    ring_bits: int
    identities: _containers.ScalarMap[int, bytes]
    base_version: int
    clip_norm: float
    noise_multiplier: float
    noise_mode: str
    privacy_unit: str
    expected_cohort: int
    fixed_point_clip: float
    cohort_max: int
    phase_deadline_unix_ms: int
    plain_sum: bool
    participation_cap: int
    cohort_size: int
    def __init__(self, round_id: _Optional[int] = ..., graph: _Optional[_Mapping[int, Neighbours]] = ..., threshold: _Optional[int] = ..., min_cohort: _Optional[int] = ..., vector_length: _Optional[int] = ..., ring_bits: _Optional[int] = ..., identities: _Optional[_Mapping[int, bytes]] = ..., base_version: _Optional[int] = ..., clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., noise_mode: _Optional[str] = ..., privacy_unit: _Optional[str] = ..., expected_cohort: _Optional[int] = ..., fixed_point_clip: _Optional[float] = ..., cohort_max: _Optional[int] = ..., phase_deadline_unix_ms: _Optional[int] = ..., plain_sum: _Optional[bool] = ..., participation_cap: _Optional[int] = ..., cohort_size: _Optional[int] = ...) -> None: ...

class KeyAdvertisement(_message.Message):
    __slots__ = ("round_id", "site", "mask_key", "share_key", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    site: int
    mask_key: bytes
    share_key: bytes
    signature: bytes
    def __init__(self, round_id: _Optional[int] = ..., site: _Optional[int] = ..., mask_key: _Optional[bytes] = ..., share_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class AdvertisedKeys(_message.Message):
    __slots__ = ("round_id", "advertisements")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISEMENTS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    advertisements: _containers.RepeatedCompositeFieldContainer[KeyAdvertisement]
    def __init__(self, round_id: _Optional[int] = ..., advertisements: _Optional[_Iterable[_Union[KeyAdvertisement, _Mapping]]] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("sender", "recipient", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    recipient: int
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., recipient: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class EncryptedShares(_message.Message):
    __slots__ = ("round_id", "sender", "shares")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    sender: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round_id: _Optional[int] = ..., sender: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class SharesForSite(_message.Message):
    __slots__ = ("round_id", "recipient", "shares")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    recipient: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round_id: _Optional[int] = ..., recipient: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class MaskedVectorChunk(_message.Message):
    __slots__ = ("round_id", "site", "ring_bits", "total_bytes", "payload_sha256", "offset", "data")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    site: int
    ring_bits: int
    total_bytes: int
    payload_sha256: bytes
    offset: int
    data: bytes
    def __init__(self, round_id: _Optional[int] = ..., site: _Optional[int] = ..., ring_bits: _Optional[int] = ..., total_bytes: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class MaskedVectorReceipt(_message.Message):
    __slots__ = ("round_id", "site", "received_bytes", "payload_sha256")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    site: int
    received_bytes: int
    payload_sha256: bytes
    def __init__(self, round_id: _Optional[int] = ..., site: _Optional[int] = ..., received_bytes: _Optional[int] = ..., payload_sha256: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("round_id", "survivors", "dropped")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round_id: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class ShamirShare(_message.Message):
    __slots__ = ("owner", "x", "y")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    owner: int
    x: int
    y: bytes
    def __init__(self, owner: _Optional[int] = ..., x: _Optional[int] = ..., y: _Optional[bytes] = ...) -> None: ...

class UnmaskShares(_message.Message):
    __slots__ = ("round_id", "site", "self_mask_shares", "mask_key_shares")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    site: int
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[ShamirShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[ShamirShare]
    def __init__(self, round_id: _Optional[int] = ..., site: _Optional[int] = ..., self_mask_shares: _Optional[_Iterable[_Union[ShamirShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[ShamirShare, _Mapping]]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("round_id", "site", "request_sha256")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    site: int
    request_sha256: bytes
    def __init__(self, round_id: _Optional[int] = ..., site: _Optional[int] = ..., request_sha256: _Optional[bytes] = ...) -> None: ...

class RoundCompleted(_message.Message):
    __slots__ = ("version", "cohort_size", "dropped")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    version: int
    cohort_size: int
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., cohort_size: _Optional[int] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class RoundAborted(_message.Message):
    __slots__ = ("reason", "retry", "phase", "drop_reason", "site_only")
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DROP_REASON_FIELD_NUMBER: _ClassVar[int]
    SITE_ONLY_FIELD_NUMBER: _ClassVar[int]
    reason: str
    retry: bool
    phase: RoundPhase
    drop_reason: DropReason
    site_only: bool
    def __init__(self, reason: _Optional[str] = ..., retry: _Optional[bool] = ..., phase: _Optional[_Union[RoundPhase, str]] = ..., drop_reason: _Optional[_Union[DropReason, str]] = ..., site_only: _Optional[bool] = ...) -> None: ...
