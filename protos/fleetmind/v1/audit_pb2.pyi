from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StreamLedgerRequest(_message.Message):
    __slots__ = ("from_index", "follow")
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    from_index: int
    follow: bool
    def __init__(self, from_index: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("index", "prev_hash", "body", "hash", "signature")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    prev_hash: bytes
    body: bytes
    hash: bytes
    signature: bytes
    def __init__(self, index: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., body: _Optional[bytes] = ..., hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class BudgetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BudgetResponse(_message.Message):
    __slots__ = ("epsilon_spent", "epsilon_budget", "delta", "rounds", "accountant", "participation_cap")
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_CAP_FIELD_NUMBER: _ClassVar[int]
    epsilon_spent: float
    epsilon_budget: float
    delta: float
    rounds: int
    accountant: str
    participation_cap: int
    def __init__(self, epsilon_spent: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ..., rounds: _Optional[int] = ..., accountant: _Optional[str] = ..., participation_cap: _Optional[int] = ...) -> None: ...
