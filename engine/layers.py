"""Tensor-parallel building blocks. Each parameter carries a `weight_loader` that
narrows a checkpoint tensor (a safetensors slice or a tensor) to this rank's shard."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine import parallel


def _load_full(param: nn.Parameter, loaded) -> None:
    param.data.copy_(loaded[:] if not isinstance(loaded, torch.Tensor) else loaded)


def _shape(loaded) -> list[int]:
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight.weight_loader = _load_full

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with residual: (norm(x + residual), x + residual), the sum kept as the new residual."""
        if x.is_cuda:
            from pdserve.engine.triton_ops import rms_norm
            y = rms_norm(x, self.weight, self.eps, residual)
            return y if residual is None else (y, residual)
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; each rank holds the rows of its shards.

    `shards` lists (checkpoint_id, rows_per_rank, rows_in_checkpoint, replicas): a
    checkpoint tensor with fewer rows than ranks need (GQA KV heads below TP) is
    replicated, each group of `replicas` ranks sharing one slice."""

    def __init__(self, in_features: int, shards: list[tuple[str, int, int, int]], bias: bool):
        super().__init__()
        self.tp_rank = parallel.rank()
        self.shards = shards
        self.offsets, total = {}, 0
        for sid, rows, _, _ in shards:
            self.offsets[sid] = (total, rows)
            total += rows
        self.weight = nn.Parameter(torch.empty(total, in_features))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(total))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        start, rows = self.offsets[shard_id]
        spec = next(s for s in self.shards if s[0] == shard_id)
        replicas = spec[3]
        src = (self.tp_rank // replicas) * rows
        if _shape(loaded)[0] != spec[2]:
            raise ValueError(f"checkpoint shard {shard_id} has {_shape(loaded)[0]} rows, expected {spec[2]}")
        param.data[start:start + rows].copy_(loaded[src:src + rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.tp, self.tp_rank = parallel.world(), parallel.rank()
        if in_features % self.tp:
            raise ValueError(f"input size {in_features} is not divisible by TP size {self.tp}")
        self.in_per_rank = in_features // self.tp
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = _load_full
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        start = self.tp_rank * self.in_per_rank
        param.data.copy_(loaded[:, start:start + self.in_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp > 1:
            y = parallel.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocab rows; each rank looks up its range, then all-reduce."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.tp = parallel.world()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // self.tp)
        self.start = parallel.rank() * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        end = min(self.start + self.per_rank, self.vocab_size)
        if end > self.start:
            param.data[:end - self.start].copy_(loaded[self.start:end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mask.unsqueeze(-1)
        return parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocab range, gathered to rank 0 (None elsewhere)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden, self.weight)
        if self.tp > 1:
            parts = parallel.gather(logits, self.tp)
            if parts is None:
                return None
            logits = torch.cat(parts, dim=-1)
        return logits[..., :self.vocab_size]


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE from a cos/sin table indexed by position (same formula as transformers)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int):
        super().__init__()
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = pos[:, None] * inv_freq.float().to(pos.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if q.is_cuda:  # one fused kernel each, in place
            from pdserve.engine.triton_ops import rope_
            return rope_(q, positions, self.cos, self.sin), rope_(k, positions, self.cos, self.sin)
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rope_store_kv(self, qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """CUDA: one kernel rotates q in place within the fused projection qkv [T, (heads + 2
        kv_heads) * D] and writes rotated k and v into the KV cache; returns q [T, heads, D]."""
        from pdserve.engine.triton_ops import rope_store_kv
        return rope_store_kv(qkv, heads, kv_heads, positions, self.cos, self.sin, k_cache, v_cache, slot_mapping)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
