from pdserve.v1 import api_pb2 as _api_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfo(_message.Message):
    __slots__ = ("name", "num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "vocab_size", "max_model_len", "compat_hash", "checkpoint_hash", "cache_root")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_HASH_FIELD_NUMBER: _ClassVar[int]
    CACHE_ROOT_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    vocab_size: int
    max_model_len: int
    compat_hash: str
    checkpoint_hash: str
    cache_root: bytes
    def __init__(self, name: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., compat_hash: _Optional[str] = ..., checkpoint_hash: _Optional[str] = ..., cache_root: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("protocol_version", "role", "address", "kv_endpoint", "tp", "model", "kv_blocks_total", "kv_transport", "kv_curve_key")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KV_CURVE_KEY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    role: _api_pb2.Role
    address: str
    kv_endpoint: str
    tp: int
    model: ModelInfo
    kv_blocks_total: int
    kv_transport: str
    kv_curve_key: str
    def __init__(self, protocol_version: _Optional[int] = ..., role: _Optional[_Union[_api_pb2.Role, str]] = ..., address: _Optional[str] = ..., kv_endpoint: _Optional[str] = ..., tp: _Optional[int] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., kv_blocks_total: _Optional[int] = ..., kv_transport: _Optional[str] = ..., kv_curve_key: _Optional[str] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("node_id", "epoch", "address", "kv_endpoint", "tp", "compat_hash", "kv_curve_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    KV_CURVE_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    address: str
    kv_endpoint: str
    tp: int
    compat_hash: str
    kv_curve_key: str
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., address: _Optional[str] = ..., kv_endpoint: _Optional[str] = ..., tp: _Optional[int] = ..., compat_hash: _Optional[str] = ..., kv_curve_key: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "epoch", "heartbeat_interval_s", "decode_peers", "prefill_peers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_PEERS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PEERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    heartbeat_interval_s: float
    decode_peers: _containers.RepeatedCompositeFieldContainer[Peer]
    prefill_peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., decode_peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., prefill_peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "kv_blocks_free", "running", "queued", "queued_tokens", "counters", "cache")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    kv_blocks_free: int
    running: int
    queued: int
    queued_tokens: int
    counters: _api_pb2.NodeCounters
    cache: CacheDelta
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., counters: _Optional[_Union[_api_pb2.NodeCounters, _Mapping]] = ..., cache: _Optional[_Union[CacheDelta, _Mapping]] = ...) -> None: ...

class CacheDelta(_message.Message):
    __slots__ = ("seq", "full", "added", "removed")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    full: bool
    added: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., full: _Optional[bool] = ..., added: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "decode_peers", "prefill_peers", "want_full_cache")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    DECODE_PEERS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PEERS_FIELD_NUMBER: _ClassVar[int]
    WANT_FULL_CACHE_FIELD_NUMBER: _ClassVar[int]
    known: bool
    decode_peers: _containers.RepeatedCompositeFieldContainer[Peer]
    prefill_peers: _containers.RepeatedCompositeFieldContainer[Peer]
    want_full_cache: bool
    def __init__(self, known: _Optional[bool] = ..., decode_peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., prefill_peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., want_full_cache: _Optional[bool] = ...) -> None: ...

class KVPairsRequest(_message.Message):
    __slots__ = ("protocol_version", "compat_hash", "prefill_node_id", "prefill_tp", "pair_set", "host_id", "kv_transport")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TP_FIELD_NUMBER: _ClassVar[int]
    PAIR_SET_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    compat_hash: str
    prefill_node_id: str
    prefill_tp: int
    pair_set: str
    host_id: str
    kv_transport: str
    def __init__(self, protocol_version: _Optional[int] = ..., compat_hash: _Optional[str] = ..., prefill_node_id: _Optional[str] = ..., prefill_tp: _Optional[int] = ..., pair_set: _Optional[str] = ..., host_id: _Optional[str] = ..., kv_transport: _Optional[str] = ...) -> None: ...

class KVPairsResponse(_message.Message):
    __slots__ = ("store_host", "store_port", "decode_tp")
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    DECODE_TP_FIELD_NUMBER: _ClassVar[int]
    store_host: str
    store_port: int
    decode_tp: int
    def __init__(self, store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., decode_tp: _Optional[int] = ...) -> None: ...

class Ticket(_message.Message):
    __slots__ = ("transfer_id", "decode_node_id", "epoch", "block_ids", "kv_endpoint", "lease_expiry", "decode_tp", "cached_blocks", "local_prefill", "kv_curve_key")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    DECODE_TP_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    KV_CURVE_KEY_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    decode_node_id: str
    epoch: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    kv_endpoint: str
    lease_expiry: float
    decode_tp: int
    cached_blocks: int
    local_prefill: bool
    kv_curve_key: str
    def __init__(self, transfer_id: _Optional[str] = ..., decode_node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., kv_endpoint: _Optional[str] = ..., lease_expiry: _Optional[float] = ..., decode_tp: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., local_prefill: _Optional[bool] = ..., kv_curve_key: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "lease_s", "epoch", "subscriber")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _api_pb2.SamplingParams
    lease_s: float
    epoch: int
    subscriber: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_api_pb2.SamplingParams, _Mapping]] = ..., lease_s: _Optional[float] = ..., epoch: _Optional[int] = ..., subscriber: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("epoch", "request_ids", "lease_s")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    lease_s: float
    def __init__(self, epoch: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("missing", "lease_expiry")
    MISSING_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[str]
    lease_expiry: float
    def __init__(self, missing: _Optional[_Iterable[str]] = ..., lease_expiry: _Optional[float] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "ticket", "keep_kv", "subscriber")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    KEEP_KV_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _api_pb2.SamplingParams
    ticket: Ticket
    keep_kv: bool
    subscriber: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_api_pb2.SamplingParams, _Mapping]] = ..., ticket: _Optional[_Union[Ticket, _Mapping]] = ..., keep_kv: _Optional[bool] = ..., subscriber: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "prefill_start", "prefill_end", "transfer_end", "text", "finish_reason")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_START_FIELD_NUMBER: _ClassVar[int]
    PREFILL_END_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    prefill_start: float
    prefill_end: float
    transfer_end: float
    text: str
    finish_reason: _api_pb2.FinishReason
    def __init__(self, first_token: _Optional[int] = ..., prefill_start: _Optional[float] = ..., prefill_end: _Optional[float] = ..., transfer_end: _Optional[float] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_api_pb2.FinishReason, str]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("coordinator_id", "epoch", "subscriber")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    epoch: int
    subscriber: str
    def __init__(self, coordinator_id: _Optional[str] = ..., epoch: _Optional[int] = ..., subscriber: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("request_id", "error", "error_code", "decode_start", "kv_ready")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    DECODE_START_FIELD_NUMBER: _ClassVar[int]
    KV_READY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    error: str
    error_code: int
    decode_start: float
    kv_ready: float
    def __init__(self, request_id: _Optional[str] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., decode_start: _Optional[float] = ..., kv_ready: _Optional[float] = ...) -> None: ...

class TokenBatch(_message.Message):
    __slots__ = ("request_ids", "first_index", "counts", "token_ids", "texts", "finish_reasons", "events")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASONS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    first_index: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    finish_reasons: _containers.RepeatedScalarFieldContainer[_api_pb2.FinishReason]
    events: _containers.RepeatedCompositeFieldContainer[TokenEvent]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., first_index: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., texts: _Optional[_Iterable[str]] = ..., finish_reasons: _Optional[_Iterable[_Union[_api_pb2.FinishReason, str]]] = ..., events: _Optional[_Iterable[_Union[TokenEvent, _Mapping]]] = ...) -> None: ...
