"""Configuration of a prefill or decode node: one dataclass, built from CLI flags."""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.config import EngineConfig


@dataclass
class NodeConfig:
    coordinator: str                         # coordinator gRPC address
    listen: str = "127.0.0.1:0"              # this node's gRPC address (port 0 = any free port)
    kv_host: str = "127.0.0.1"               # decode: where the KV receiver binds (tcp)
    kv_ipc: str | None = None                # decode: bind an ipc:// path instead of tcp
    kv_transport: str = "zmq"                # zmq, or nccl (GPU to GPU; gloo on CPU)
    kv_layers_per_message: int = 1           # prefill: layers coalesced into one KV message
    lease_s: float = 30.0                    # decode: how long reserved blocks wait for their KV
    max_unread_batches: int = 4096           # decode: a token stream this far behind is ended
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.kv_transport not in ("zmq", "nccl"):
            raise ValueError(f"--kv-transport {self.kv_transport!r} is not available (zmq, nccl)")
        if self.kv_transport == "nccl" and self.kv_ipc:
            raise ValueError("--kv-ipc is a ZeroMQ option; the nccl transport's control socket is tcp")
        if self.kv_layers_per_message < 1:
            raise ValueError("--kv-layers-per-message must be >= 1")
