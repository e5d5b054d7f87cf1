"""The KV layout both ends of a transfer agree on: which global KV heads a TP rank
holds, how big a frame is, and how a decode rank's heads are cut out of the
prefill ranks' shards (prefill TP p and decode TP d may differ)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

# dtypes allowed on the wire, by the name a KVHeader carries
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) != dtype:
        raise ValueError(f"KV dtype {dtype} is not one of {sorted(DTYPES)}")
    return name


def kv_head_range(rank: int, tp: int, num_kv_heads: int) -> tuple[int, int]:
    """Global KV heads [start, end) held by `rank` of `tp` (engine/model.py's rule):
    n = max(1, H // tp) heads each; where H < tp, groups of tp // H ranks share a head."""
    if tp < 1 or not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is not in a TP group of size {tp}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f"TP size {tp} and {num_kv_heads} KV heads: one must divide the other")
    n = max(1, num_kv_heads // tp)
    start = (rank // max(1, tp // num_kv_heads)) * n
    return start, start + n


def unique_ranks(tp: int, num_kv_heads: int) -> list[int]:
    """The first rank of each group holding the same heads: the only shards worth sending."""
    seen: set[tuple[int, int]] = set()
    ranks = []
    for r in range(tp):
        heads = kv_head_range(r, tp, num_kv_heads)
        if heads not in seen:
            seen.add(heads)
            ranks.append(r)
    return ranks


def assemble_heads(shards: list[tuple[int, torch.Tensor]], start: int, end: int) -> torch.Tensor:
    """Heads [start, end) of a layer from (head_start, [2, nb, bs, h, D]) shards: a view
    when one shard holds them all, else the pieces concatenated on the head axis."""
    pieces, h = [], start
    while h < end:
        for first, t in shards:
            if first <= h < first + t.shape[3]:
                stop = min(end, first + t.shape[3])
                pieces.append(t[:, :, :, h - first:stop - first])
                h = stop
                break
        else:
            raise ValueError(f"no shard holds KV head {h}")
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=3)


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    compat_hash: str

    @classmethod
    def create(cls, model: str, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype) -> KVLayout:
        """A layout whose compat_hash covers the model name and every field above."""
        key = f"kv-layout-v1|{model}|{num_layers}|{num_kv_heads}|{head_dim}|{block_size}|{dtype_name(dtype)}"
        return cls(num_layers, num_kv_heads, head_dim, block_size, dtype, hashlib.sha256(key.encode()).hexdigest()[:16])

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def heads(self, rank: int, tp: int) -> tuple[int, int]:
        return kv_head_range(rank, tp, self.num_kv_heads)

    def shard_shape(self, num_blocks: int, num_heads: int) -> tuple[int, int, int, int, int]:
        return 2, num_blocks, self.block_size, num_heads, self.head_dim

    def frame_bytes(self, num_blocks: int, num_heads: int) -> int:
        return 2 * num_blocks * self.block_size * num_heads * self.head_dim * self.dtype.itemsize
