from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVShard(_message.Message):
    __slots__ = ("tp_rank", "head_start", "num_heads")
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    tp_rank: int
    head_start: int
    num_heads: int
    def __init__(self, tp_rank: _Optional[int] = ..., head_start: _Optional[int] = ..., num_heads: _Optional[int] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("protocol_version", "compat_hash", "transfer_id", "epoch", "layer_start", "num_layers", "total_layers", "num_blocks", "block_size", "head_dim", "dtype", "shards", "frame_xxh3", "frame_bytes", "last", "first_token", "pair_set", "withdrawn")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FRAME_XXH3_FIELD_NUMBER: _ClassVar[int]
    FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAIR_SET_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    compat_hash: str
    transfer_id: str
    epoch: int
    layer_start: int
    num_layers: int
    total_layers: int
    num_blocks: int
    block_size: int
    head_dim: int
    dtype: str
    shards: _containers.RepeatedCompositeFieldContainer[KVShard]
    frame_xxh3: _containers.RepeatedScalarFieldContainer[int]
    frame_bytes: _containers.RepeatedScalarFieldContainer[int]
    last: bool
    first_token: int
    pair_set: str
    withdrawn: bool
    def __init__(self, protocol_version: _Optional[int] = ..., compat_hash: _Optional[str] = ..., transfer_id: _Optional[str] = ..., epoch: _Optional[int] = ..., layer_start: _Optional[int] = ..., num_layers: _Optional[int] = ..., total_layers: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[KVShard, _Mapping]]] = ..., frame_xxh3: _Optional[_Iterable[int]] = ..., frame_bytes: _Optional[_Iterable[int]] = ..., last: _Optional[bool] = ..., first_token: _Optional[int] = ..., pair_set: _Optional[str] = ..., withdrawn: _Optional[bool] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("transfer_id", "ok", "error", "granted")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    ok: bool
    error: str
    granted: bool
    def __init__(self, transfer_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., granted: _Optional[bool] = ...) -> None: ...

class KVIpcBuffer(_message.Message):
    __slots__ = ("handle", "storage_size_bytes", "storage_offset_bytes", "tensor_offset", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "pid", "fd")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    tensor_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    pid: int
    fd: int
    def __init__(self, handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., tensor_offset: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class KVIpcExport(_message.Message):
    __slots__ = ("protocol_version", "host_id", "tp_rank", "device", "device_index", "shape", "dtype", "k", "v")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    host_id: str
    tp_rank: int
    device: str
    device_index: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    k: KVIpcBuffer
    v: KVIpcBuffer
    def __init__(self, protocol_version: _Optional[int] = ..., host_id: _Optional[str] = ..., tp_rank: _Optional[int] = ..., device: _Optional[str] = ..., device_index: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., k: _Optional[_Union[KVIpcBuffer, _Mapping]] = ..., v: _Optional[_Union[KVIpcBuffer, _Mapping]] = ...) -> None: ...
