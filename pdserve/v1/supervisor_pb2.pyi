from pdserve.v1 import api_pb2 as _api_pb2
from pdserve.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeRecord(_message.Message):
    __slots__ = ("id", "role", "address", "kv_endpoint", "tp", "model", "epoch", "kv_blocks_total", "kv_blocks_free", "running", "queued", "queued_tokens", "silent_s", "down", "counters", "cache_version", "cache_full", "cache_added", "cache_removed", "kv_curve_key")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SILENT_S_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_FULL_FIELD_NUMBER: _ClassVar[int]
    CACHE_ADDED_FIELD_NUMBER: _ClassVar[int]
    CACHE_REMOVED_FIELD_NUMBER: _ClassVar[int]
    KV_CURVE_KEY_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: _api_pb2.Role
    address: str
    kv_endpoint: str
    tp: int
    model: _node_pb2.ModelInfo
    epoch: int
    kv_blocks_total: int
    kv_blocks_free: int
    running: int
    queued: int
    queued_tokens: int
    silent_s: float
    down: bool
    counters: _api_pb2.NodeCounters
    cache_version: int
    cache_full: bool
    cache_added: _containers.RepeatedScalarFieldContainer[int]
    cache_removed: _containers.RepeatedScalarFieldContainer[int]
    kv_curve_key: str
    def __init__(self, id: _Optional[str] = ..., role: _Optional[_Union[_api_pb2.Role, str]] = ..., address: _Optional[str] = ..., kv_endpoint: _Optional[str] = ..., tp: _Optional[int] = ..., model: _Optional[_Union[_node_pb2.ModelInfo, _Mapping]] = ..., epoch: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., silent_s: _Optional[float] = ..., down: _Optional[bool] = ..., counters: _Optional[_Union[_api_pb2.NodeCounters, _Mapping]] = ..., cache_version: _Optional[int] = ..., cache_full: _Optional[bool] = ..., cache_added: _Optional[_Iterable[int]] = ..., cache_removed: _Optional[_Iterable[int]] = ..., kv_curve_key: _Optional[str] = ...) -> None: ...

class NodeTable(_message.Message):
    __slots__ = ("nodes", "model")
    NODES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeRecord]
    model: _node_pb2.ModelInfo
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeRecord, _Mapping]]] = ..., model: _Optional[_Union[_node_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: int
    def __init__(self, worker: _Optional[int] = ...) -> None: ...

class FenceRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "reason", "worker")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    reason: str
    worker: int
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ..., worker: _Optional[int] = ...) -> None: ...

class FenceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("worker", "pid", "ready", "streaming", "served", "inflight")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    worker: int
    pid: int
    ready: bool
    streaming: _containers.RepeatedScalarFieldContainer[str]
    served: int
    inflight: int
    def __init__(self, worker: _Optional[int] = ..., pid: _Optional[int] = ..., ready: _Optional[bool] = ..., streaming: _Optional[_Iterable[str]] = ..., served: _Optional[int] = ..., inflight: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
