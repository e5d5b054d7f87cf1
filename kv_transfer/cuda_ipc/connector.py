"""The cuda-ipc transport's engine side: the KV connector worker each TP rank builds
(engine/kv_connector.py). Channels are pairs (prefill rank, decode rank):

- decode rank, connect: export this rank's pool once and publish it in the pairing
  store under the pair's name (the decode manager adds the pair's head offset there).
- prefill rank, connect: fetch the export (waiting up to timeout_s), check host, dtype
  and geometry, open the peer's pool. disconnect drops it (a decode restart reopens
  pairs under new names: old handles are never used again).
- save: the copies of each layer go on a side stream behind that layer's event (GPU), or
  all at finish_step (CPU); the compute stream waits for them before its next kernels,
  so the prompt's blocks may be freed as on any transport. get_finished reports a save
  once its copies ran, with the checksum verdict."""
from __future__ import annotations

import logging

import torch

from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorWorker, KVSave
from pdserve.kv_transfer.nccl.store import connect_store
from pdserve.v1 import kv_pb2

from .config import IpcConfig
from .copier import Copier, Job, Peer, Route
from .export import export_pool, open_pool

log = logging.getLogger(__name__)


def store_key(pair: str, what: str) -> str:
    return f"pdserve-kv-ipc/{pair}/{what}"


class IpcConnector(KVConnectorWorker):
    config_class = IpcConfig

    def __init__(self, config: IpcConfig, rank: int, tp: int):
        super().__init__(config, rank, tp)
        self.kv = None
        self.copier: Copier | None = None
        self.peers: dict[str, Peer] = {}
        self._export: bytes | None = None
        self._step: list[Job] = []
        self._events: list | None = None
        self._pending: list[Job] = []
        self._ended: dict[int, str] = {}

    def register_kv_cache(self, kv, device) -> None:
        self.kv = kv
        cuda = torch.device(device).type == "cuda"
        stream = torch.cuda.Stream(device) if cuda else None
        self.copier = Copier(kv.k, kv.v, stream, self.config.verify, self.config.max_copy_runs,
                             full_checksums=self.config.verify_full)

    def apply(self, meta: KVConnectorMetadata) -> None:
        for name in meta.disconnect:
            self.peers.pop(name, None)
        for ch in meta.connect:
            store = connect_store(ch.host, ch.port, self.config.timeout_s)
            if ch.side == 1:
                if self._export is None:
                    self._export = export_pool(self.kv.k, self.kv.v, self.rank).SerializeToString()
                store.set(store_key(ch.name, "export"), self._export)
            else:
                self.peers[ch.name] = self._open(ch.name, store)
        if meta.loads:
            raise ValueError("the cuda-ipc transport posts no loads: the prefill ranks write the blocks")

    def _open(self, name: str, store) -> Peer:
        msg = kv_pb2.KVIpcExport.FromString(store.get(store_key(name, "export")))
        dst_head = int(store.get(store_key(name, "dst_head")))
        kv = self.kv
        want = (kv.num_layers, kv.block_size, kv.head_dim, str(kv.k.dtype).removeprefix("torch."))
        got = (msg.shape[0], msg.shape[2], msg.shape[4], msg.dtype)
        if got != want:
            raise ValueError(f"pair {name}: the decode pool is layers x block_size x head_dim {got[:3]} {got[3]}, "
                             f"this rank's {want[:3]} {want[3]}")
        if (msg.device == "cuda") != (kv.k.device.type == "cuda"):
            raise ValueError(f"pair {name}: the decode pool is on {msg.device}, this rank on {kv.k.device.type}")
        k, v = open_pool(msg)
        return Peer(name, k, v, dst_head)

    def start_step(self, saves: tuple[KVSave, ...], layer_events: list | None) -> None:
        self._events = layer_events
        for s in saves:
            try:
                routes = [Route(self.peers[r.channel], r.head, r.heads) for r in s.routes]
                job = self.copier.job(s.key, routes, list(s.block_ids), list(s.remote_block_ids),
                                      corrupt=self.config.fault == "checksum")
            except (KeyError, ValueError) as e:
                job = Job(s.key, [], [], [], None, error=f"cannot copy: {type(e).__name__}: {e}")
            self._step.append(job)

    def save_layer(self, layer: int) -> None:
        if self._events is not None and self._step:
            self._copy(layer)

    def finish_step(self) -> None:
        """Layers no hook queued (CPU, a replayed prefill graph) go now, each behind its event where there is one."""
        first = min((j.layers for j in self._step), default=self.kv.num_layers)
        if self._events is not None:
            for layer in range(first, self.kv.num_layers):
                self._copy(layer)
        elif first < self.kv.num_layers:  # no per-layer events: every layer is computed, one copy each run
            self._copy(first, self.kv.num_layers - first)
        self._end_step()

    def _copy(self, layer: int, count: int = 1) -> None:
        c = self.copier
        jobs = [j for j in self._step if not j.error and j.layers == layer]
        if not jobs:
            return
        if c.stream is None:
            for job in jobs:
                self._guard(job, lambda: c.copy_layers(job, layer, count))
            return
        if self._events is not None:
            c.stream.wait_event(self._events[layer + count - 1])
        else:
            c.stream.wait_stream(torch.cuda.current_stream(c.stream.device))
        with torch.cuda.stream(c.stream):
            for job in jobs:
                self._guard(job, lambda: c.copy_layers(job, layer, count))

    def abort_step(self, reason: str) -> None:
        for job in self._step:
            if job.layers < self.kv.num_layers:
                job.error = job.error or reason
        self._end_step()

    def _end_step(self) -> None:
        c = self.copier
        if c.stream is not None and self._step:
            done = torch.cuda.Event()
            done.record(c.stream)
            torch.cuda.current_stream(c.stream.device).wait_event(done)  # the blocks stay until copied
            for job in self._step:
                job.done = done
        self._pending.extend(self._step)
        self._step, self._events = [], None

    def _guard(self, job: Job, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported through get_finished
            log.exception("KV copy of transfer %d failed", job.key)
            job.error = f"copy failed: {type(e).__name__}: {e}"

    def get_finished(self) -> dict[int, str]:
        out, left = {}, []
        for job in self._pending:
            if job.done is not None and not job.done.query():
                left.append(job)
                continue
            if not job.error and job.layers < self.kv.num_layers:
                job.error = f"only {job.layers} of {self.kv.num_layers} layers were copied"
            out[job.key] = job.error or self.copier.check(job)
        self._pending = left
        return out

    def close(self) -> None:
        if self.copier is not None and self.copier.stream is not None:
            self.copier.stream.synchronize()
        self.peers.clear()
        self._pending.clear()
