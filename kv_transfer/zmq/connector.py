"""The ZeroMQ transport's engine side: the KV connector worker (engine/kv_connector.py).
Every TP rank of a prefill node gets each save; rank 0 claims its sender from streams.py.
As each layer is computed, every rank copies that layer's prompt blocks out of its cache
and, at TP > 1, gathers them to rank 0 (a collective in the layer's hook, so every rank
runs the same copies in the same order, whatever failed on rank 0); rank 0 hands layer
groups of layers_per_message to the sender, whose I/O thread sends them while later
layers compute.

CPU: save_layer(layer) copies the layer and hands over full groups at once.
CUDA: each layer's copy waits for the layer's event on a side stream (the gather runs
there too), then goes to pinned host memory (non_blocking); a copy thread waits for
each group's copies and hands it over. At TP > 1 the layers a replayed prefill graph
left start after the whole graph (its captured all-reduces share the gathers'
communicator). finish_step queues what is left (a replayed graph calls no save_layer),
makes the compute stream wait for the gathers (the blocks are freed after the step) and
waits for the copy thread, so the finish (first token) is queued after every layer."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from pdserve.engine import parallel
from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorWorker, KVSave

from . import streams
from .config import ZmqConfig


@dataclass
class _Save:
    """A save of the running step: its sender (rank 0), block ids, next layer to copy, the group being filled."""
    key: int
    sink: streams.LayerSink | None
    block_ids: tuple[int, ...]
    idx: torch.Tensor | None = None   # block_ids on the device, made at the first copy (not before the forward)
    next: int = 0
    group: list[list[torch.Tensor]] = field(default_factory=list)   # [layer][tp rank] on the host
    error: str = ""


class ZmqConnector(KVConnectorWorker):
    config_class = ZmqConfig

    def __init__(self, config: ZmqConfig, rank: int, tp: int):
        super().__init__(config, rank, tp)
        self.kv = None
        self._saves: list[_Save] = []
        self._events: list | None = None
        self._ended: dict[int, str] = {}
        self._side: torch.cuda.Stream | None = None
        self._copies: queue.Queue | None = None   # (save, layer_start, host tensors, done event) | None
        self._copier: threading.Thread | None = None

    def register_kv_cache(self, kv, device) -> None:
        self.kv, self.device = kv, device

    def _start_copier(self) -> None:
        """CUDA, at the first save: the side stream, and on rank 0 the copy thread
        (nodes that never save have neither)."""
        self._side = torch.cuda.Stream(self.device)
        if self.rank == 0:
            self._copies = queue.Queue()
            self._copier = threading.Thread(target=self._copy_loop, name="pdserve-kv-d2h", daemon=True)
            self._copier.start()

    def apply(self, meta: KVConnectorMetadata) -> None:
        """Nothing: ZeroMQ has no channels to join, and the decode side receives on the node."""

    def start_step(self, saves: tuple[KVSave, ...], layer_events: list | None) -> None:
        self._events = layer_events
        for s in saves:
            sink = streams.claim(s.key) if self.rank == 0 else None
            if sink is None and self.rank == 0:
                if self.tp == 1:
                    self._ended[s.key] = "the sender ended before its step"
                    continue
                # the other ranks copy it anyway: the gathers stay in step
                self._saves.append(_Save(s.key, None, s.block_ids, error="the sender ended before its step"))
                continue
            self._saves.append(_Save(s.key, sink, s.block_ids))
        if self._saves and self.device.type == "cuda" and self._side is None:
            self._start_copier()

    def save_layer(self, layer: int) -> None:
        self._copy_until(layer + 1)

    def finish_step(self) -> None:
        if self.tp > 1 and self._side is not None and any(s.next < self.kv.num_layers for s in self._saves):
            # layers a replayed graph left (it calls no save_layer): its captured all-reduces must be
            # done before the gathers start on the same communicator, or the ranks may deadlock
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        self._copy_until(self.kv.num_layers)
        self._end_step()

    def abort_step(self, reason: str) -> None:
        for s in self._saves:
            if s.next < self.kv.num_layers:
                s.error = s.error or reason
        self._end_step()

    def get_finished(self) -> dict[int, str]:
        ended, self._ended = self._ended, {}
        return ended

    def close(self) -> None:
        if self._copier is not None:
            self._copies.put(None)
            self._copier.join()
            self._copier = None

    def _copy_until(self, end: int) -> None:
        """Copy layers [s.next, end) of every save; rank 0 hands over each group that fills up.
        At TP > 1 every layer is copied on every rank, failed or not (the gathers are collective)."""
        last = self.kv.num_layers
        for s in self._saves:
            while s.next < end and (self.tp > 1 or not s.error):
                try:
                    parts = self._copy(s, s.next)
                except Exception as e:  # this transfer fails, not the step
                    self._fail(s, f"KV copy of layer {s.next} failed: {type(e).__name__}: {e}")
                    if self.tp > 1:
                        raise  # a rank out of step with the others' gathers: the step fails
                    break
                s.next += 1
                if s.sink is None or s.error:
                    continue
                s.group.append(parts)
                if len(s.group) == self.config.layers_per_message or s.next == last:
                    group, s.group = s.group, []
                    self._hand_over(s, s.next - len(group), group)

    def _copy(self, s: _Save, layer: int) -> list[torch.Tensor] | None:
        """Layer `layer` of the save's blocks, [2, n_blocks, block_size, kv_heads, head_dim] of
        every TP rank, on rank 0's host (None on the other ranks)."""
        k, v = self.kv.k[layer], self.kv.v[layer]
        if self._side is None:
            s.idx = torch.tensor(s.block_ids, dtype=torch.long) if s.idx is None else s.idx
            return parallel.gather(torch.stack((k.index_select(0, s.idx), v.index_select(0, s.idx))), self.tp)
        with torch.cuda.stream(self._side):
            if s.idx is None:  # on the side stream, which alone reads it
                s.idx = torch.tensor(s.block_ids, dtype=torch.long, device=self.device)
            self._side.wait_event(self._events[layer])
            parts = parallel.gather(torch.stack((k.index_select(0, s.idx), v.index_select(0, s.idx))), self.tp)
            if parts is None:
                return None
            hosts = []
            for dev in parts:
                host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                hosts.append(host.copy_(dev, non_blocking=True))
        return hosts

    def _hand_over(self, s: _Save, start: int, group: list[list[torch.Tensor]]) -> None:
        if self._copies is None:
            self._send(s, start, group)
            return
        done = torch.cuda.Event()
        done.record(self._side)
        self._copies.put((s, start, group, done))

    def _send(self, s: _Save, start: int, group: list[list[torch.Tensor]]) -> None:
        try:
            s.sink.send_layers(start, group)
        except Exception as e:
            self._fail(s, f"KV send of layers {start}+{len(group)} failed: {type(e).__name__}: {e}")

    def _fail(self, s: _Save, error: str) -> None:
        s.error = s.error or error
        if s.sink is not None:
            s.sink.fail(s.error)

    def _end_step(self) -> None:
        """The blocks may be freed and the finish queued once this returns."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            if self._copies is not None:
                self._copies.join()
        for s in self._saves:
            if s.error and s.sink is not None:
                s.sink.fail(s.error)
            self._ended[s.key] = s.error
        self._saves, self._events = [], None

    def _copy_loop(self) -> None:
        while (item := self._copies.get()) is not None:
            s, start, group, done = item
            try:
                if not s.error:
                    done.synchronize()
                    self._send(s, start, group)
            except Exception as e:  # a failed copy fails its transfer
                self._fail(s, f"KV copy failed: {type(e).__name__}: {e}")
            finally:
                self._copies.task_done()
        self._copies.task_done()
