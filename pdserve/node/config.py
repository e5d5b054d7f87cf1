"""Configuration of a prefill or decode node: one dataclass, built from CLI flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.registry import config_class, make_config


@dataclass
class NodeConfig:
    coordinator: str                         # coordinator gRPC address
    listen: str = "127.0.0.1:0"              # this node's gRPC address (port 0 = any free port)
    kv_transport: str = "zmq"                # KV backend by name: zmq, or nccl (GPU to GPU; gloo on CPU)
    kv: Any = None                           # that backend's config (kv_transfer/<name>/config.py); None = defaults
    lease_s: float = 30.0                    # decode: how long reserved blocks wait for their KV
    max_unread_batches: int = 4096           # decode: a token stream this far behind is ended
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        cls = config_class(self.kv_transport)  # raises for an unknown transport
        if self.kv is None:
            self.kv = make_config(self.kv_transport)
        elif not isinstance(self.kv, cls):
            raise ValueError(f"the {self.kv_transport} KV transport takes a {cls.__name__}, "
                             f"not a {type(self.kv).__name__}")
