"""The paged KV pool of one rank, and export/import of a sequence's KV by layer.

Layout: k and v are [num_layers, num_blocks, block_size, kv_heads, head_dim]; a
layer's export is one contiguous [2, n_blocks, block_size, kv_heads, head_dim]
tensor, which is what a transport sends (never one message per block)."""
from __future__ import annotations

import ctypes

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def bind(self, attention_modules) -> None:
        for layer, attn in enumerate(attention_modules):
            attn.k_cache, attn.v_cache = self.k[layer], self.v[layer]

    def export_layer(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        return torch.stack((self.k[layer].index_select(0, idx), self.v[layer].index_select(0, idx)))

    def import_layer(self, layer: int, block_ids: list[int], data: torch.Tensor, non_blocking: bool = False) -> None:
        """Write [2, n_blocks, block_size, kv_heads, head_dim] (any device, any dtype) into the blocks;
        non_blocking: data is pinned host memory, its copies to the device are only queued."""
        expected = (2, len(block_ids), self.block_size, self.kv_heads, self.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV layer {layer}: got shape {tuple(data.shape)}, expected {expected}")
        runs = _runs(block_ids)
        if len(runs) <= MAX_RUNS:  # a few slice copies: no index tensor to build, no gather kernel
            for first, at, n in runs:
                copy_into(self.k[layer, first:first + n], data[0, at:at + n], non_blocking)
                copy_into(self.v[layer, first:first + n], data[1, at:at + n], non_blocking)
            return
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.k.device)
        data = data.to(device=self.k.device, dtype=self.k.dtype, non_blocking=non_blocking)
        self.k[layer].index_copy_(0, idx, data[0])
        self.v[layer].index_copy_(0, idx, data[1])


def copy_into(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """dst <- src; host to host as one memmove (GIL released): torch's copy_ splits a few
    hundred KiB over the intra-op thread pool, whose wake-ups cost far more than the copy
    on a busy host (60x measured on 2 shared cores), and other threads write KV here too."""
    if (dst.device.type == src.device.type == "cpu" and dst.dtype == src.dtype and dst.is_contiguous()
            and src.is_contiguous()):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.nbytes)
    else:
        dst.copy_(src, non_blocking=non_blocking)


MAX_RUNS = 4  # runs of consecutive block ids copied slice by slice; more go through one index_copy_


def _runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first block id, its index in block_ids, length) of each run of consecutive ids."""
    runs, i = [], 0
    while i < len(block_ids):
        j = i + 1
        while j < len(block_ids) and block_ids[j] == block_ids[j - 1] + 1:
            j += 1
        runs.append((block_ids[i], i, j - i))
        i = j
    return runs
