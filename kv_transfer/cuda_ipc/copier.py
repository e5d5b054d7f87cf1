"""The copy layer of the cuda-ipc transport: a transfer's heads, a range of layers at a
time, from this rank's pool into a peer's opened pool, and the checksums of both ends.

Blocks are matched one to one (src_ids[i] -> dst_ids[i]). On a GPU whose peer pool is on
the same device, one fused kernel launch per route and layer range moves the block rows
and checksums them in the same pass (kernels.py); a last launch per route checksums the
destination. Elsewhere (CPU, a peer on another GPU) torch does it: where the blocks form
few contiguous runs, each run of a layer range's k or v is one Tensor.copy_, otherwise
one gather/scatter pair per layer, and the checksum is the int64 sum of the moved heads
over all layers read as int32 words, both ends after the last copy on the same stream.
The source blocks stay unchanged until the decode node acknowledges."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, count) of each run where both sides are consecutive."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
    runs: list[list[int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


@dataclass
class Peer:
    """A peer rank's opened pool (k, v: [layers, blocks, block_size, heads, head_dim])."""
    name: str
    k: torch.Tensor
    v: torch.Tensor
    dst_head: int   # where the pair's heads start in the peer's pool


@dataclass
class Route:
    peer: Peer
    src_head: int
    heads: int


@dataclass
class Job:
    """One transfer on this rank: its routes, blocks, and the checksums queued so far."""
    key: int
    routes: list[Route]
    src_ids: list[int]
    dst_ids: list[int]
    runs: list[tuple[int, int, int]] | None      # None: gather/scatter
    idx: dict = field(default_factory=dict)      # device -> (src index, dst index) tensors
    sums: list[torch.Tensor] = field(default_factory=list)   # [2] int64 per (layer, route, k|v)
    layers: int = 0          # layers queued
    error: str = ""
    done: object = None      # CUDA event after the last copy (None on CPU)
    corrupt: bool = False    # fault injection (tests)
    rows: torch.Tensor | None = None   # fused kernel: [routes, 2 (src, dst), layers, 2 * blocks] row checksums
    plans: list | None = None          # fused kernel: per route, its (copy, check) launches


class Copier:
    """Queues a job's copies on `stream` (None: synchronous, CPU). kernels: use the fused
    kernel where it applies (None: on a GPU). full_checksums: the kernel's checksums cover
    every word, not one token slot of each block row (kernels.py)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, stream=None, verify: bool = True, max_runs: int = 32,
                 kernels: bool | None = None, full_checksums: bool = False):
        self.k, self.v, self.stream, self.verify, self.max_runs = k, v, stream, verify, max_runs
        self.sample = not full_checksums
        self._peer_streams: dict = {}   # another GPU's pool: checksums there run on a stream of that GPU
        self.pool = self._supported = None
        if k.is_cuda if kernels is None else kernels:
            from .kernels import PoolCopier, supported  # Triton: imported only where the kernel runs
            self.pool, self._supported = PoolCopier(k, v), supported

    def job(self, key: int, routes: list[Route], src_ids: list[int], dst_ids: list[int], corrupt: bool = False) -> Job:
        runs = block_runs(src_ids, dst_ids)
        cross = any(r.peer.k.device != self.k.device for r in routes)
        use_runs = cross or len(runs) <= self.max_runs  # kernels on another GPU would need its streams: copies only
        for r in routes:
            if max(dst_ids) >= r.peer.k.shape[1] or r.peer.dst_head + r.heads > r.peer.k.shape[3]:
                raise ValueError(f"blocks or heads past the peer pool of {r.peer.name}")
        job = Job(key, routes, list(src_ids), list(dst_ids), runs if use_runs else None, corrupt=corrupt)
        if self.pool is not None and all(self._supported(self.k, r.peer.k, r.heads) for r in routes):
            job.rows = torch.empty((len(routes), 2, self.k.shape[0], 2 * len(dst_ids)), dtype=torch.int64,
                                   device=self.k.device)
        return job

    def copy_layer(self, job: Job, layer: int) -> None:
        """Queue layer `layer` of every route (the caller orders it after the layer was computed)."""
        self.copy_layers(job, layer, 1)

    def copy_layers(self, job: Job, first: int, count: int) -> None:
        """Queue layers [first, first + count) of every route on this copier's stream: with
        block runs, one copy per run and k|v for the whole range. The checksums follow the
        last layer. The caller orders the stream after the layers were computed."""
        if self.stream is not None:
            with torch.cuda.stream(self.stream):  # check() reads the sums back on this stream
                self._copy_layers(job, first, count)
        else:
            self._copy_layers(job, first, count)

    def _copy_layers(self, job: Job, first: int, count: int) -> None:
        if job.rows is not None:
            return self._launch(job, first, count)
        layers = slice(first, first + count)
        for r in job.routes:
            sh, dh, n = r.src_head, r.peer.dst_head, r.heads
            for src_pool, dst_pool in ((self.k, r.peer.k), (self.v, r.peer.v)):
                src = src_pool[layers, :, :, sh:sh + n]
                dst = dst_pool[layers, :, :, dh:dh + n]
                if job.runs is not None:
                    for s, d, c in job.runs:
                        dst[:, d:d + c].copy_(src[:, s:s + c], non_blocking=True)
                else:
                    si, di = self._index(job, src.device)
                    for i in range(count):
                        dst[i].index_copy_(0, di, src[i].index_select(0, si))
                if job.corrupt and first == 0:
                    self._ordered(dst.device, lambda: dst[0, job.dst_ids[0]].add_(1))
        job.layers = first + count
        if self.verify and job.layers == self.k.shape[0]:
            self._checksums(job)

    def _launch(self, job: Job, first: int, count: int) -> None:
        """The fused kernel: each route's rows of layers [first, first + count) moved and
        checksummed; after the last layer, each route's destination checksummed."""
        if job.plans is None:
            si, di = self._index(job, self.k.device)
            job.plans = [tuple(self.pool.plan(r.peer.k, r.peer.v, si, di, job.rows[i, side], r.src_head,
                                              r.peer.dst_head, r.heads, copy=side == 0, sample=self.sample)
                               for side in (0, 1)) for i, r in enumerate(job.routes)]
        for (copy, _), r in zip(job.plans, job.routes):
            copy.run(first, first + count, self.stream)
            if job.corrupt and first == 0:
                r.peer.k[0, job.dst_ids[0], :, r.peer.dst_head:r.peer.dst_head + r.heads].add_(1)
        job.layers = first + count
        if self.verify and job.layers == self.k.shape[0]:
            for _, check in job.plans:
                check.run(0, job.layers, self.stream)

    def _checksums(self, job: Job) -> None:
        """Both ends' sums of every route's k and v over all layers, behind the copies."""
        for r in job.routes:
            sh, dh, n = r.src_head, r.peer.dst_head, r.heads
            for src_pool, dst_pool in ((self.k, r.peer.k), (self.v, r.peer.v)):
                src, dst = src_pool[:, :, :, sh:sh + n], dst_pool[:, :, :, dh:dh + n]
                s = self._sum(job, src, 0)
                job.sums.append(torch.stack((s, self._ordered(dst.device, lambda: self._sum(job, dst, 1))
                                             .to(s.device))))

    def _ordered(self, device: torch.device, fn):
        """fn() on `device` behind what this copier queued so far: on this copier's stream
        when the device is its own; on another GPU, on a stream there that waits for it
        (and that this copier's stream then waits for)."""
        if self.stream is None or device == self.stream.device:
            return fn()
        if device not in self._peer_streams:
            self._peer_streams[device] = torch.cuda.Stream(device)
        peer = self._peer_streams[device]
        peer.wait_stream(self.stream)
        with torch.cuda.device(device), torch.cuda.stream(peer):
            out = fn()
        self.stream.wait_stream(peer)
        return out

    def _index(self, job: Job, device: torch.device):
        if device not in job.idx:
            job.idx[device] = (torch.tensor(job.src_ids, dtype=torch.long).to(device, non_blocking=True),
                               torch.tensor(job.dst_ids, dtype=torch.long).to(device, non_blocking=True))
        return job.idx[device]

    def _sum(self, job: Job, t: torch.Tensor, side: int) -> torch.Tensor:
        """The int64 sum of the job's blocks of t ([layers, blocks, ...]; side 0: source ids,
        1: destination ids) as int32 words: over each run in place, or over the gathered blocks."""
        if job.runs is not None:
            sums = [_words(t[:, r[side]:r[side] + r[2]]).sum(dtype=torch.int64) for r in job.runs]
            return sums[0] if len(sums) == 1 else torch.stack(sums).sum()
        return _words(t.index_select(1, self._index(job, t.device)[side])).sum(dtype=torch.int64)

    def check(self, job: Job) -> str:
        """After the job's copies ran: "" or which layer's checksums differ."""
        if job.rows is not None and not job.error and self.verify:
            return self._check_rows(job)
        if job.error or not job.sums:
            return job.error
        if self.stream is not None:  # read back on the (finished) side stream, not behind the next forward
            with torch.cuda.stream(self.stream):
                sums = torch.stack(job.sums).cpu().tolist()
        else:
            sums = torch.stack(job.sums).tolist()
        for i, (a, b) in enumerate(sums):
            if a != b:
                r = job.routes[i // 2]
                return f"checksum mismatch ({'kv'[i % 2]}, pair {r.peer.name})"
        return ""

    def _check_rows(self, job: Job) -> str:
        """The fused kernel's verdict: per route, layer and k|v, the source rows' sum against the destination's."""
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            sums = job.rows.view(*job.rows.shape[:3], 2, -1).sum(-1)   # [routes, src|dst, layers, k|v]
            bad = (sums[:, 0] != sums[:, 1]).nonzero().tolist()
        if not bad:
            return ""
        route, layer, kv = bad[0]
        return f"checksum mismatch ({'kv'[kv]}, layer {layer}, pair {job.routes[route].peer.name})"


def _words(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as int32 words (a head is whole words: head_dim x itemsize is a multiple of 4)."""
    return (t if t.stride(-1) == 1 else t.contiguous()).view(torch.int32)
