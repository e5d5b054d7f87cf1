"""Buffers of the NCCL KV transport on one rank: views of the paged cache gathered into
and scattered from contiguous messages (torch ops), message buffers, and the
page-locked host buffers that carry block ids to the fused kernels (HostIds)."""
from __future__ import annotations

import array
import ctypes

import torch


class HostIds:
    """Page-locked host buffers for block ids (GPU). The fused kernels read them in place,
    so a transfer's ids reach the device with no copy or torch call on its critical path.
    A buffer is taken per part and released once the last kernel that reads it is queued;
    an event then guards its reuse."""

    KEEP = 64  # released buffers kept for reuse

    def __init__(self):
        self._free: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def take(self, values: array.array) -> torch.Tensor:
        """A page-locked int64 tensor whose first len(values) entries are values."""
        n = len(values)
        for i, (t, event) in enumerate(self._free):
            if t.numel() >= n and event.query():
                del self._free[i]
                break
        else:
            t = torch.empty(max(256, 1 << (n - 1).bit_length()), dtype=torch.int64, pin_memory=True)
        ctypes.memmove(t.data_ptr(), values.buffer_info()[0], n * 8)
        return t

    def release(self, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """t may be reused once what is queued on stream so far ran."""
        event = torch.cuda.Event()
        event.record(stream)
        self._free.append((t, event))
        if len(self._free) > self.KEEP:  # drop one no kernel can still read (torch may hand it out again)
            done = next((i for i, (_, e) in enumerate(self._free) if e.query()), None)
            if done is not None:
                del self._free[done]


_WIDE = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def wide(t: torch.Tensor) -> torch.Tensor:
    """The same bytes viewed with the widest element that divides a head (head_dim x itemsize
    bytes, every offset here a multiple of it): the index kernels move 16 bytes per
    element instead of 2, several times faster for bfloat16, bit for bit the same."""
    width = t.shape[-1] * t.element_size()
    return t.view(next(dt for w, dt in _WIDE.items() if width % w == 0))


class KVBuffers:
    """This rank's paged cache as a transfer sees it: layers of some heads of some blocks
    gathered into one contiguous message and scattered back, and message buffers."""

    def __init__(self, kv):
        self.kv = kv  # engine.kv_cache.KVCache: k and v of [layers, blocks, block_size, heads, head_dim]

    def layer_bytes(self, nb: int, heads: int) -> int:
        kv = self.kv
        return 2 * nb * kv.block_size * heads * kv.head_dim * kv.k.element_size()

    def gather(self, idx: torch.Tensor, l0: int, l1: int, head: int, heads: int) -> torch.Tensor:
        """[l1 - l0, 2, n_blocks, block_size, heads, head_dim] of (k, v), contiguous."""
        k, v = self.kv.k, self.kv.v
        buf = torch.empty((l1 - l0, 2, len(idx), k.shape[2], heads, k.shape[4]), dtype=k.dtype, device=k.device)
        for src, i in ((k, 0), (v, 1)):
            torch.index_select(wide(src[l0:l1, :, :, head:head + heads]), 1, idx, out=wide(buf[:, i]))
        return buf

    def scatter(self, idx: torch.Tensor, l0: int, l1: int, head: int, heads: int, buf: torch.Tensor,
                into: list[torch.Tensor] | None = None) -> None:
        for dst, i in zip(into or (self.kv.k, self.kv.v), (0, 1)):
            wide(dst[l0:l1, :, :, head:head + heads]).index_copy_(1, idx, wide(buf[:, i]))

    def empty(self, layers: int, nb: int, heads: int) -> torch.Tensor:
        k = self.kv.k
        return torch.empty((layers, 2, nb, k.shape[2], heads, k.shape[4]), dtype=k.dtype, device=k.device)

    def flat(self, layers: int, nb: int, heads: int) -> torch.Tensor:
        """A fused message's buffer: the same bytes as empty()'s, one dimension (NCCL
        matches a send with its receive by bytes; both ends use the cache's dtype)."""
        k = self.kv.k
        return torch.empty(layers * 2 * nb * k.shape[2] * heads * k.shape[4], dtype=k.dtype, device=k.device)

    def for_part(self, groups: list[tuple[int, int]], heads: int, nb: int, fused: bool) -> list[torch.Tensor]:
        """One buffer per message of a part."""
        new = self.flat if fused else self.empty
        return [new(l1 - l0, nb, heads) for l0, l1 in groups]
