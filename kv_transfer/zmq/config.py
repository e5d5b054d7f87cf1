"""Settings of the ZeroMQ KV transport (--kv-host, --kv-ipc, --kv-layers-per-message)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ZmqConfig:
    host: str = "127.0.0.1"          # decode: the address the KV receiver binds (tcp)
    ipc: str | None = None           # decode: bind this ipc:// path instead of tcp
    layers_per_message: int = 1      # prefill: layers coalesced into one KV message

    def __post_init__(self) -> None:
        if self.layers_per_message < 1:
            raise ValueError("--kv-layers-per-message must be >= 1")
