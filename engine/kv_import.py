"""KV written into reserved blocks from another thread (a decode node's KV receive
thread) without a round trip through the engine thread per layer, so that many
transfers land at once, none waiting for a step.

TP 1: write() copies into the cache at once: on CPU directly (the blocks are
reserved, no step reads or writes them), on CUDA through pinned memory onto a side
stream that the compute stream waits for at the next flush (the receive thread queues
the copies and goes on; the caching host allocator keeps each pinned buffer until its
copy is done). TP > 1: the other ranks are processes that hear
only from the engine thread, so write() queues, and flush() applies everything queued
in one operation on every rank. The engine thread flushes before each step, each
admission of prefilled KV and each release of reserved blocks, so a sequence never
runs before its KV is in place on every rank, and a freed block is never written late."""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from pdserve.engine.kv_cache import KVCache, copy_into

# one write: (block ids, first layer, [layer][tp rank] KV shards)
Write = tuple[list[int], int, list[list[torch.Tensor]]]


class KVImports:
    def __init__(self, kv: KVCache, device: torch.device, tp: int, check: Callable[[int, list], None],
                 apply: Callable[[list[Write]], None] | None = None):
        """kv, device: rank 0's cache; check(num_blocks, layers) raises ValueError on a bad
        shape; apply(writes) writes a batch on every rank (engine thread; needed at TP > 1)."""
        self.kv, self.device, self.check, self.apply = kv, device, check, apply
        self.direct = tp == 1
        self._lock = threading.Lock()
        self._queued: list[Write] = []
        self._stream: torch.cuda.Stream | None = None
        self._dirty = False   # the side stream holds writes the compute stream has not waited for

    def write(self, block_ids: list[int], layer_start: int, layers: list[list[torch.Tensor]]) -> None:
        """Any thread: write [layer][rank] shards into reserved blocks (ValueError on a bad shape)."""
        self.check(len(block_ids), layers)
        if not self.direct:
            with self._lock:
                self._queued.append((list(block_ids), layer_start, layers))
            return
        kv = self.kv
        if self.device.type != "cuda":
            for i, shards in enumerate(layers):
                kv.import_layer(layer_start + i, block_ids, shards[0])
            return
        with self._lock:  # one writer at a time on the side stream
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._stream):
                for i, shards in enumerate(layers):
                    kv.import_layer(layer_start + i, block_ids, _pinned(shards[0]), non_blocking=True)
            self._dirty = True

    def flush(self) -> None:
        """Engine thread: everything written so far is in place for the next step, on every rank."""
        with self._lock:
            queued, self._queued = self._queued, []
            dirty, self._dirty = self._dirty, False
        if dirty:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        if queued:
            self.apply(queued)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queued)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A host tensor staged in pinned memory (a device tensor as it is)."""
    if t.device.type != "cpu":
        return t
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    copy_into(staged, t)
    return staged
