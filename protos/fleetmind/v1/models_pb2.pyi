from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("after_version",)
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    after_version: int
    def __init__(self, after_version: _Optional[int] = ...) -> None: ...

class VersionAnnouncement(_message.Message):
    __slots__ = ("version", "manifest", "manifest_sig")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIG_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest: bytes
    manifest_sig: bytes
    def __init__(self, version: _Optional[int] = ..., manifest: _Optional[bytes] = ..., manifest_sig: _Optional[bytes] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("version", "file", "offset", "max_chunk_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    file: str
    offset: int
    max_chunk_bytes: int
    def __init__(self, version: _Optional[int] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("version", "file", "offset", "data", "chunk_sha256", "total_bytes", "file_sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    file: str
    offset: int
    data: bytes
    chunk_sha256: bytes
    total_bytes: int
    file_sha256: bytes
    def __init__(self, version: _Optional[int] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., file_sha256: _Optional[bytes] = ...) -> None: ...

class LatestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
