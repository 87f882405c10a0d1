from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StartRecordingRequest(_message.Message):
    __slots__ = ("image_ref", "manifest_digest", "layer_digests")
    IMAGE_REF_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYER_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    image_ref: str
    manifest_digest: str
    layer_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image_ref: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., layer_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class StartRecordingResponse(_message.Message):
    __slots__ = ("recording_id", "manifest_digest")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    manifest_digest: str
    def __init__(self, recording_id: _Optional[str] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class StopRecordingRequest(_message.Message):
    __slots__ = ("recording_id", "discard")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    DISCARD_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    discard: bool
    def __init__(self, recording_id: _Optional[str] = ..., discard: _Optional[bool] = ...) -> None: ...

class StopRecordingResponse(_message.Message):
    __slots__ = ("manifest_digest", "path", "summary_json")
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    manifest_digest: str
    path: str
    summary_json: bytes
    def __init__(self, manifest_digest: _Optional[str] = ..., path: _Optional[str] = ..., summary_json: _Optional[bytes] = ...) -> None: ...

class GetProfileRequest(_message.Message):
    __slots__ = ("manifest_digest",)
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    manifest_digest: str
    def __init__(self, manifest_digest: _Optional[str] = ...) -> None: ...

class GetProfileResponse(_message.Message):
    __slots__ = ("found", "profile_json")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    found: bool
    profile_json: bytes
    def __init__(self, found: _Optional[bool] = ..., profile_json: _Optional[bytes] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("status_json",)
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    status_json: bytes
    def __init__(self, status_json: _Optional[bytes] = ...) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("apply",)
    APPLY_FIELD_NUMBER: _ClassVar[int]
    apply: bool
    def __init__(self, apply: _Optional[bool] = ...) -> None: ...

class PruneResponse(_message.Message):
    __slots__ = ("applied", "chunks", "bytes", "kept_chunks", "kept_bytes")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    KEPT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    KEPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    chunks: int
    bytes: int
    kept_chunks: int
    kept_bytes: int
    def __init__(self, applied: _Optional[bool] = ..., chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., kept_chunks: _Optional[int] = ..., kept_bytes: _Optional[int] = ...) -> None: ...
