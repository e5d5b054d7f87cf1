"""The worker side of a KV connector: the one interface through which the engine moves
KV to and from other nodes (after vLLM v1's KVConnectorBase_V1 worker role).

Every TP rank builds its own worker from a KVConnectorSpec (module path, class name,
the backend's config as JSON), resolved with importlib: the engine imports no
transport. One KVConnectorMetadata goes down to every rank per call, as the bytes of
a typed JSON codec (never pickled), already cut to what each rank moves:

    apply(meta)                      outside a step: connect/disconnect channels, post loads
    start_step(saves, layer_events)  before the forward of a step that completes prompts
    save_layer(layer)                after each layer's forward in that step
    finish_step() | abort_step(why)  after the forward (or when it failed)
    get_finished()                   key -> error ("" when ok) of transfers ended since the last call

The node side (reservations, pairing, control messages) lives in the transport
(pdserve.kv_transfer); it reaches the ranks only through LLMEngine.kv_apply,
the saves attached to sequences (add_request(kv_save=...)) and LLMEngine.kv_finished."""
from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from typing import Any, ClassVar


class KVPoll(IntEnum):
    """A transfer's state over the TP group: FAILED = 0, so a MIN over the ranks lets one failure win."""
    FAILED = 0
    PENDING = 1
    DONE = 2


@dataclass(frozen=True)
class KVRoute:
    """Heads [head, head + heads) of TP rank `rank`'s cache move over `channel`."""
    rank: int
    channel: str
    head: int
    heads: int


@dataclass(frozen=True)
class KVChannel:
    """A channel that TP rank `rank` joins as `side` (0 sends, 1 receives) through the rendezvous at host:port."""
    name: str
    rank: int
    side: int
    host: str
    port: int


@dataclass(frozen=True)
class KVSave:
    """Save blocks block_ids (all layers) under `key` along `routes`; the engine fills
    block_ids with the sequence's prompt blocks in the step that completes its prompt.
    remote_block_ids: the peer's reserved blocks, for transports that write them directly."""
    key: int
    routes: tuple[KVRoute, ...]
    block_ids: tuple[int, ...] = ()
    remote_block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class KVLoad:
    """Load all num_layers layers of `key` into blocks block_ids along `routes`."""
    key: int
    block_ids: tuple[int, ...]
    routes: tuple[KVRoute, ...]
    num_layers: int


@dataclass(frozen=True)
class KVConnectorMetadata:
    connect: tuple[KVChannel, ...] = ()
    disconnect: tuple[str, ...] = ()
    loads: tuple[KVLoad, ...] = ()
    saves: tuple[KVSave, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.connect or self.disconnect or self.loads or self.saves)

    def for_rank(self, rank: int) -> KVConnectorMetadata:
        """What `rank` does: its channels and routes, and only the transfers it has routes in
        (a rank with nothing to move reports those done)."""
        def mine(routes):
            return tuple(r for r in routes if r.rank == rank)
        return KVConnectorMetadata(
            tuple(c for c in self.connect if c.rank == rank), self.disconnect,
            tuple(replace(t, routes=mine(t.routes)) for t in self.loads if mine(t.routes)),
            tuple(replace(t, routes=mine(t.routes)) for t in self.saves if mine(t.routes)))

    @property
    def keys(self) -> list[int]:
        return [t.key for t in (*self.loads, *self.saves)]

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> KVConnectorMetadata:
        d = json.loads(data)
        routes = lambda items: tuple(KVRoute(**r) for r in items)  # noqa: E731
        return cls(tuple(KVChannel(**c) for c in d["connect"]), tuple(d["disconnect"]),
                   tuple(KVLoad(t["key"], tuple(t["block_ids"]), routes(t["routes"]), t["num_layers"])
                         for t in d["loads"]),
                   tuple(KVSave(t["key"], routes(t["routes"]), tuple(t["block_ids"]), tuple(t["remote_block_ids"]))
                         for t in d["saves"]))


class KVConnectorWorker(ABC):
    """One per TP rank. Its config is the backend's own dataclass (config_class)."""
    config_class: ClassVar[type]

    def __init__(self, config: Any, rank: int, tp: int):
        self.config, self.rank, self.tp = config, rank, tp

    @abstractmethod
    def register_kv_cache(self, kv, device) -> None:
        """kv: this rank's engine.kv_cache.KVCache, on `device`."""

    @abstractmethod
    def apply(self, meta: KVConnectorMetadata) -> None:
        """Between steps: close meta.disconnect, join meta.connect (blocking, in order), post meta.loads."""

    @abstractmethod
    def start_step(self, saves: tuple[KVSave, ...], layer_events: list | None) -> None:
        """Before the forward. layer_events (GPU): the CUDA event the forward records after each layer."""

    def save_layer(self, layer: int) -> None:
        """After layer `layer` was queued (and its event recorded) in a step with saves."""

    @abstractmethod
    def finish_step(self) -> None:
        """After the forward was queued: whatever the saves still hold goes now."""

    @abstractmethod
    def abort_step(self, reason: str) -> None:
        """The forward failed: saves not fully issued fail."""

    @abstractmethod
    def get_finished(self) -> dict[int, str]:
        """Transfers of this rank that ended since the last call: key -> error ("" when ok)."""

    @abstractmethod
    def close(self) -> None: ...


@dataclass(frozen=True)
class KVConnectorSpec:
    """Names the worker class each TP rank builds and carries its config, typed as JSON."""
    module: str
    name: str
    config: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> KVConnectorSpec:
        return cls(**json.loads(text))

    def build(self, rank: int, tp: int) -> KVConnectorWorker:
        cls = getattr(importlib.import_module(self.module), self.name)
        if not (isinstance(cls, type) and issubclass(cls, KVConnectorWorker)):
            raise TypeError(f"{self.module}.{self.name} is not a KVConnectorWorker")
        return cls(cls.config_class(**self.config), rank, tp)
