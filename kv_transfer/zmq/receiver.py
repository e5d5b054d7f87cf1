"""Decode side, one per request: accept() checks one message against this transfer's
reservation and, only when every frame of it is whole, writes its layers re-sliced
to the decode ranks' heads. Lifecycle: expect (WAITING) -> first message
(TRANSFERRING) -> last message (DONE, first_token set) | any failure (FAILED)."""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from pdserve.v1 import kv_pb2

from pdserve.kv_transfer.base.conn import KVReceiver, WriteFn
from pdserve.kv_transfer.base.header import Buffer, check_frames, check_layout
from pdserve.kv_transfer.base.layout import KVLayout, assemble_heads
from pdserve.kv_transfer.base.status import TransferState


class ZmqKVReceiver(KVReceiver):
    def __init__(self, layout: KVLayout, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
                 tp: int, write: WriteFn):
        super().__init__(transfer_id, epoch, block_ids, lease_expiry, tp)
        self.layout = layout
        self._write = write
        self._next_layer = 0
        self._heads = [layout.heads(r, tp) for r in range(tp)]
        self._lock = threading.RLock()  # held while writing, so fail() waits out a write in progress

    def accept(self, header: kv_pb2.KVHeader, frames: Sequence[Buffer]) -> str:
        """Check and write one message; returns the failure reason ("" if accepted)."""
        with self._lock:
            if self.status.ended:
                return self.error or "transfer already complete"
            error = (check_layout(header, self.layout, len(self.block_ids), self._next_layer)
                     or check_frames(header, self.layout, frames))
            if error:
                self.fail(error)
                return error
            self.status.start()
            try:
                self._write_layers(header, frames)
            except Exception as e:  # the owner's write failed: the transfer cannot complete
                error = f"write failed at layer {self._next_layer}: {type(e).__name__}: {e}"
                self.fail(error)
                return error
            if header.last:
                if self._next_layer != self.layout.num_layers:
                    error = f"incomplete: last message after {self._next_layer} of {self.layout.num_layers} layers"
                    self.fail(error)
                    return error
                self.first_token = header.first_token
                self.status.finish()
            return ""

    def fail(self, error: str) -> bool:
        """FAILED unless already ended; once this returns no write() runs."""
        with self._lock:
            return self.status.fail(error)

    def _write_layers(self, header: kv_pb2.KVHeader, frames: Sequence[Buffer]) -> None:
        nb, dtype = header.num_blocks, self.layout.dtype
        shards = list(header.shards)
        tensors = [torch.frombuffer(f, dtype=dtype).view(self.layout.shard_shape(nb, shards[i % len(shards)].num_heads))
                   for i, f in enumerate(frames)]
        for i in range(header.num_layers):
            layer_shards = [(s.head_start, tensors[i * len(shards) + j]) for j, s in enumerate(shards)]
            per_rank = [assemble_heads(layer_shards, start, end) for start, end in self._heads]
            self._write(header.layer_start + i, per_rank)
            self._next_layer += 1

    def __repr__(self) -> str:
        return f"ZmqKVReceiver({self.transfer_id!r}, epoch={self.epoch}, {TransferState(self.state).name})"
