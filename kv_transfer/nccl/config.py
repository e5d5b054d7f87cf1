"""Settings of the NCCL KV transport (--kv-host, --kv-timeout, --kv-min-message-mib, --kv-max-ctas)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NcclConfig:
    host: str = "127.0.0.1"          # decode: the control socket and the pairs' rendezvous store bind here
    timeout_s: float = 30.0          # a transfer pending longer than this aborts its pair
    min_message_mib: float = 16.0    # layers are grouped into messages of at least this many MiB
    max_ctas: int = 0                # SMs a pair's NCCL kernels may take; 0 = NCCL's choice

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.min_message_mib < 0 or self.max_ctas < 0:
            raise ValueError("--kv-timeout must be > 0, --kv-min-message-mib and --kv-max-ctas >= 0")
