"""Engine configuration: one dataclass, built from CLI flags."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch


@dataclass
class EngineConfig:
    model: str | None = None            # checkpoint folder, .gguf file, or None for the default model
    tp: int = 1                          # tensor-parallel ranks (processes)
    device: str = "cpu"                  # "cpu", "cuda" or "cuda:N" (rank r uses cuda:N+r)
    dtype: str = "auto"                  # auto = float32 on CPU, bfloat16 on GPU
    block_size: int = 16
    kv_blocks: int | None = None         # KV pool size in blocks; None = derived (see kv_pool_blocks)
    gpu_memory_utilization: float = 0.9  # on GPU, fraction of free memory for the KV pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None     # None = the model's max_position_embeddings
    chunked_prefill: bool = True
    max_tokens_limit: int = 32768       # largest max_tokens a request may ask for
    enforce_eager: bool = False         # GPU: no CUDA graphs at all
    prefill_graphs: bool = True         # GPU: CUDA graphs for steps with prompt tokens too (engine/prefill_graphs.py)
    load_format: str = "auto"           # "dummy": random weights from config.json alone (benchmarks)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"--kv-blocks must be >= 1, got {self.kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype}")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.is_cuda else torch.float32
        return getattr(torch, self.dtype)

    def rank_device(self, rank: int) -> torch.device:
        if not self.is_cuda:
            return torch.device("cpu")
        base = int(self.device.split(":")[1]) if ":" in self.device else 0
        return torch.device("cuda", base + rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        return cls(**json.loads(text))
