"""Settings of the cuda-ipc KV transport; as node flags they are --kv-<field>."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.common.flags import opt

FAULTS = ("", "checksum")


@dataclass
class IpcConfig:
    host: str = opt("127.0.0.1", "decode: the control socket and the pairing store bind here")
    timeout_s: float = opt(30.0, "seconds a pairing or a write grant may take", flag="--kv-timeout")
    verify: bool = opt(True, "cuda-ipc: checksum each layer at both ends of its copy (reads the written blocks back)",
                       off="--kv-no-verify")
    verify_full: bool = opt(False, "cuda-ipc on one GPU: the checksums cover every word of each block, not one token "
                                   "slot of each (reads all written blocks back: about 1.5x the copy's memory traffic)")
    max_copy_runs: int = opt(32, "cuda-ipc: blocks in more contiguous runs than this move with one gather/scatter "
                                 "kernel per layer instead of copy-engine copies")
    fault: str = opt("", "cuda-ipc, tests only: 'checksum' corrupts each transfer's first block after its copy",
                     choices=FAULTS)

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_copy_runs < 1:
            raise ValueError("--kv-timeout must be > 0 and --kv-max-copy-runs >= 1")
        if self.fault not in FAULTS:
            raise ValueError(f"--kv-fault must be one of {FAULTS}")
