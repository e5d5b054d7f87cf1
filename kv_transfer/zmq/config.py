"""Settings of the ZeroMQ KV transport; as node flags they are --kv-<field>."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.flags import opt


@dataclass
class ZmqConfig:
    host: str = opt("127.0.0.1", "decode: the address the KV receiver binds (tcp)")
    ipc: str | None = opt(None, "decode: bind the KV receiver to this ipc:// path instead of tcp")
    layers_per_message: int = opt(1, "prefill: layers coalesced into one KV message")
    ack_timeout_s: float = opt(30.0, "prefill: a transfer not acknowledged this many seconds after its last "
                                     "message was queued fails (UNAVAILABLE; the coordinator retries the request)",
                               flag="--kv-ack-timeout")
    fault_hooks: bool = opt(False, "tests only: prefill: SIGUSR1 cuts the next transfer's connection, SIGUSR2 "
                                   "corrupts its next frame (kv_transfer/base/faults.py)")
    recv_writers: int = opt(0, "decode: threads that check and write received KV messages "
                               "(0: the receive thread does; measured faster on one host)")

    def __post_init__(self) -> None:
        if self.layers_per_message < 1:
            raise ValueError("--kv-layers-per-message must be >= 1")
        if self.ack_timeout_s <= 0:
            raise ValueError("--kv-ack-timeout must be > 0")
        if self.recv_writers < 0:
            raise ValueError("--kv-recv-writers must be >= 0")
