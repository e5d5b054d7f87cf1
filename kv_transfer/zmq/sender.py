"""Prefill side, one per request: send_layers / finish check the shards and queue
them for the manager's I/O thread, which checksums and sends each message (so the
caller never waits on the network), layers_per_message layers a message. A streamed
sender offers itself under its save's key (streams.py): the engine's connector worker
(rank 0, which gathers the other ranks' shards) hands it each layer group as the
prompt's step computes it; complete() exports what the step did not send (everything,
unstreamed) and sends the first token. The
shards stay referenced until the transfer ends. Lifecycle: created (WAITING) -> first send
(TRANSFERRING) -> receiver's ack (DONE | FAILED) | no ack within wait()'s timeout or
withdrawn (FAILED)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.kv_connector import KVRoute, KVSave
from pdserve.kv_transfer.base.conn import ExportFn, KVSender, Outgoing
from pdserve.kv_transfer.base.header import Buffer, build_header
from pdserve.kv_transfer.base.layout import KVLayout, unique_ranks

from . import streams


class ZmqKVSender(KVSender):
    def __init__(self, layout: KVLayout, tp: int, endpoint: str, transfer_id: str, epoch: int, num_blocks: int,
                 submit: Callable[[ZmqKVSender, Outgoing], None], layers_per_message: int = 1,
                 stream: bool = False):
        """stream: the engine step sends the layers (its save routes every TP rank's heads)."""
        super().__init__(transfer_id, epoch, num_blocks, endpoint)
        if num_blocks < 1:
            raise ValueError(f"a transfer needs at least one block, got {num_blocks}")
        self.layout, self.tp, self.layers_per_message = layout, tp, layers_per_message
        self._submit = submit
        self._sent = False  # something was queued: a failure without an answer then suspects the peer
        self._ranks = unique_ranks(tp, layout.num_kv_heads)
        self._shards = [(r, *self._head_span(r)) for r in self._ranks]  # (tp_rank, head_start, num_heads)
        self._next_layer = 0
        self._finished = False
        self._held: list[torch.Tensor] = []  # alive until the transfer ends
        if stream:  # every rank takes part in the save's gathers, replicated heads too
            self.save = KVSave(streams.new_key(), tuple(KVRoute(r, endpoint, *self._head_span(r)) for r in range(tp)))
            streams.offer(self.save.key, self)

    def send_layers(self, layer_start: int, layers: list[list[torch.Tensor]]) -> None:
        if self._finished:
            raise RuntimeError(f"transfer {self.transfer_id}: send_layers after finish")
        if layer_start != self._next_layer or layer_start + len(layers) > self.layout.num_layers:
            raise ValueError(f"transfer {self.transfer_id}: layers {layer_start}+{len(layers)}, "
                             f"expected to start at {self._next_layer} of {self.layout.num_layers}")
        shards = [self._check(layer_start + i, r, shards_of_layer) for i, shards_of_layer in enumerate(layers)
                  for r in self._ranks]
        self._next_layer += len(layers)
        if self.status.ended:  # refused already: nothing more to send
            return
        self._held.extend(shards)
        self.status.start()
        self._sent = True
        self._submit(self, Outgoing(layer_start, len(layers), shards))

    def finish(self, first_token: int) -> None:
        if self._next_layer != self.layout.num_layers:
            raise ValueError(f"transfer {self.transfer_id}: finish after {self._next_layer} "
                             f"of {self.layout.num_layers} layers")
        if self._finished:
            raise RuntimeError(f"transfer {self.transfer_id}: finish called twice")
        self._finished = True
        if not self.status.ended:
            self.status.start()
            self._sent = True
            self._submit(self, Outgoing(self._next_layer, 0, [], last=True, first_token=first_token))

    def complete(self, first_token: int, export: ExportFn) -> None:
        """Engine thread, before the prompt's blocks are freed: export and queue the layers
        its step did not stream, then the first token."""
        first, step = self._next_layer, self.layers_per_message
        if self.status.ended:  # failed already: nothing more to export
            self._next_layer, self._finished = self.layout.num_layers, True
            return
        layers = export(first, self.layout.num_layers - first) if first < self.layout.num_layers else []
        for i in range(0, len(layers), step):
            self.send_layers(first + i, layers[i:i + step])
        self.finish(first_token)

    @property
    def peer_suspect(self) -> bool:
        return self._sent and super().peer_suspect

    def build_message(self, out: Outgoing) -> list[bytes | Buffer]:
        """[header, *frames] of a queued message (I/O thread: checksums happen here)."""
        frames = [memoryview(t.view(torch.uint8).reshape(-1).numpy()) for t in out.shards]
        self.bytes_sent = (self.bytes_sent or 0) + sum(f.nbytes for f in frames)
        header = build_header(self.layout, self.transfer_id, self.epoch, self.num_blocks, out.layer_start,
                              out.num_layers, self._shards if out.num_layers else [], frames, out.last,
                              out.first_token)
        return [header, *frames]

    def release(self) -> None:
        """Drop the shards (and an unclaimed offer) once the transfer has ended."""
        if self.status.ended:
            self._held = []
            if self.save is not None:
                streams.drop(self.save.key)

    def _head_span(self, rank: int) -> tuple[int, int]:
        start, end = self.layout.heads(rank, self.tp)
        return start, end - start

    def _check(self, layer: int, rank: int, shards_of_layer: list[torch.Tensor]) -> torch.Tensor:
        if len(shards_of_layer) != self.tp:
            raise ValueError(f"layer {layer}: {len(shards_of_layer)} shards for TP {self.tp}")
        t = shards_of_layer[rank]
        want = self.layout.shard_shape(self.num_blocks, self._head_span(rank)[1])
        if tuple(t.shape) != want or t.dtype != self.layout.dtype:
            raise ValueError(f"layer {layer} rank {rank}: {tuple(t.shape)} {t.dtype}, "
                             f"expected {want} {self.layout.dtype}")
        return t.detach().cpu().contiguous()
