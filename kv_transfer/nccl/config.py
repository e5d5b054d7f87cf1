"""Settings of the NCCL KV transport; as node flags they are --kv-<field>."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.flags import opt


@dataclass
class NcclConfig:
    host: str = opt("127.0.0.1", "decode: the control socket and the pairs' rendezvous store bind here")
    timeout_s: float = opt(30.0, "seconds a transfer may take before its pair is aborted and rebuilt",
                           flag="--kv-timeout")
    min_message_mib: float = opt(16.0, "layers go in messages of at least this many MiB (fewer, larger "
                                       "messages against a shorter tail after the last layer)")
    max_ctas: int = opt(0, "most SMs each KV pair's NCCL kernels may take (0: NCCL's choice)")

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.min_message_mib < 0 or self.max_ctas < 0:
            raise ValueError("--kv-timeout must be > 0, --kv-min-message-mib and --kv-max-ctas >= 0")
