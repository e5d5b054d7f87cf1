"""The CUDA path of RankKV: each part's messages are gathered (or scattered) on the
pair's stream by the fused kernels (kernels.py; torch ops where a head is not whole
int32 words) and sent (or received) on its wire stream; kernels are preloaded once."""
from __future__ import annotations

import array

import torch

from . import verify
from .buffers import HostIds, KVBuffers
from .state import Part
from .streams import SendSteps

try:  # the fused gather/scatter + checksum kernels (GPU); torch ops where Triton is missing
    from . import kernels
except ImportError:
    kernels = None


class CudaPath:
    """A GPU rank's data path: the fused kernels' mover, the block-id buffers, and the
    compute stream's event that unstreamed sends wait for."""

    def __init__(self, bufs: KVBuffers, device: torch.device, gather_programs: int = 0):
        self.bufs, self.kv, self.device = bufs, bufs.kv, device
        # the fused kernels where Triton is there; gather_programs caps their grid
        self.mover = kernels.Mover(self.kv.k, self.kv.v, gather_programs) if kernels is not None else None
        self.host_ids = HostIds()
        self.computed = torch.cuda.Event()  # RankKV.send(): the compute stream up to now (one event, reused)
        self.trace = None  # diagnostics only (trace.Trace)
        self._fused: dict[tuple[int, int], bool] = {}

    def fused(self, head: int, heads: int) -> bool:
        """Whether messages of these heads move through the fused kernels."""
        fused = self._fused.get((head, heads))
        if fused is None:
            fused = self._fused[(head, heads)] = self.mover is not None and kernels.supported(self.kv.k, head, heads)
        return fused

    def preload(self) -> None:
        """Launch the kernels transfers use once, now. CUDA loads kernels lazily (unless
        CUDA_MODULE_LOADING=EAGER), and loading one waits for the kernels running on the
        device, a NCCL receive spinning until its peer sends included: a first scatter
        queued behind a posted receive held recv() until the data came, for ever with a
        dead peer. Reads the live cache (harmless); writes only scratch tensors. Kernel
        variants picked by size or alignment that this misses can still stall once, so
        rank processes should run with CUDA_MODULE_LOADING=EAGER."""
        kv, k = self.kv, self.kv.k
        layers = min(kv.num_layers, 4)
        with torch.cuda.stream(torch.cuda.Stream(self.device)):
            for nb in {1, min(kv.num_blocks, 3), min(kv.num_blocks, 40)}:
                idx = torch.tensor(list(range(nb)), dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
                scratch = [torch.zeros((layers, nb, *k.shape[2:]), dtype=k.dtype, device=self.device)
                           for _ in range(2)]
                h = kv.kv_heads  # all heads, one, and a strided few: the kernels differ by layout
                for head, heads in {(0, h), (h - 1, 1), *([(1, h - 2)] if h > 2 else [])}:
                    for l0, l1 in ((0, layers), (0, 1), (layers - 1, layers)):
                        buf = self.bufs.gather(idx, l0, l1, head, heads)
                        sums = torch.empty(layers + 3, dtype=torch.int64, device=self.device)
                        for start in range(4):  # every alignment of a slice of the checksums
                            sums[start:start + l1 - l0] = verify.checksum(buf)
                        self.bufs.scatter(idx, l0, l1, head, heads, buf, scratch)
                head3 = torch.tensor([1, 2, 3], dtype=torch.int64).pin_memory()
                tail = torch.cat((head3.to(self.device, non_blocking=True), sums))
                host = torch.empty(2 * tail.numel(), dtype=torch.int64, pin_memory=True)
                host[:tail.numel()].copy_(tail, non_blocking=True)
        if kernels is not None:
            kernels.preload(k, list(range(1, kv.kv_heads + 1)))
        torch.cuda.synchronize(self.device)

    def send(self, part: Part, meta: array.array, layer_events, compute) -> SendSteps:
        """A generator: queues the part's gathers on the pair's stream and its sends on the
        pair's wire stream, each send behind its own gather only. With layer_events it
        yields, before each group, the last layer that group needs (run by streams.py as
        the forward queues the layers); without, it runs through at once. Only what the
        first message needs comes before its send: where the KV is already computed, the
        host time spent here before it is time the link stands idle."""
        pair, layers, trace, nb = part.pair, self.kv.num_layers, self.trace, len(meta) - 3
        stream, wire, comm = pair.stream, pair.wire, pair.comm
        ids = self.host_ids.take(meta)  # [block ids..., key, n_blocks, num_layers], page-locked
        try:
            if layer_events is None:
                stream.wait_event(self.computed)  # recorded by RankKV.send() on the compute stream
            sizes = [self.bufs.layer_bytes(nb, part.heads) * (l1 - l0) for l0, l1 in part.groups]
            numel = sum(sizes) // self.kv.k.element_size()
            if layer_events is None:  # the gathers wait for all the compute queued so far: its memory is free
                whole = torch.empty(numel, dtype=self.kv.k.dtype, device=self.device)
            else:
                # made on the pair's stream: memory the caching allocator hands out there was
                # last used there (on the compute stream it could still be in use by queued
                # layers that the early gathers do not wait for)
                torch.cuda.set_stream(stream)
                try:
                    whole = torch.empty(numel, dtype=self.kv.k.dtype, device=self.device)
                finally:
                    torch.cuda.set_stream(compute)
            part.bufs.append(whole)  # freed only once nothing queued can touch it (see RankKV._advance)
            if trace:
                trace.host("buffer made")
            if part.fused:
                rows = pair.row_sums(layers, nb, self.device)
            else:
                with torch.cuda.stream(stream):
                    dev = ids[:nb + 3].to(self.device, non_blocking=True)
                    tail = torch.empty(3 + layers, dtype=torch.int64, device=self.device)
            start, base, handle = 0, whole.data_ptr(), stream.cuda_stream
            ids_ptr, rows_ptr = ids.data_ptr(), rows.data_ptr() if part.fused else 0
            for i, (l0, l1) in enumerate(part.groups):
                if layer_events is not None:
                    yield l1 - 1  # resumed once that layer was queued and its event recorded
                    stream.wait_event(layer_events[l1 - 1])
                at = base + start
                if part.fused and self.mover.launch(ids_ptr, at, rows_ptr, l0, l1, part.head, part.heads, False, nb,
                                                     handle):
                    pass  # launched by address: no torch call before the send
                elif part.fused:
                    buf = whole[start // self.kv.k.element_size():(start + sizes[i]) // self.kv.k.element_size()]
                    self.mover.move(ids, l0, l1, part.head, part.heads, buf.view(torch.int32), rows, False, nb, stream)
                else:
                    buf = whole[start // self.kv.k.element_size():(start + sizes[i]) // self.kv.k.element_size()]
                    with torch.cuda.stream(stream):
                        buf.copy_(self.bufs.gather(dev[:nb], l0, l1, part.head, part.heads).view(-1))
                        tail[3 + l0:3 + l1] = verify.checksum(buf.view(l1 - l0, 2, nb, -1))
                if trace:
                    trace.host(f"gather {i} launched")
                    trace.gpu(f"gathered {i}", stream)
                wire.wait_event(pair.mark(i, stream))
                comm.send(at, sizes[i], 1, wire.cuda_stream)
                start += sizes[i]
                if trace:
                    trace.host(f"send {i} issued")
                    trace.gpu(f"sent {i}", wire)
            whole.record_stream(wire)  # its memory is not handed out again before the sends read it
            if layer_events is None:
                whole.record_stream(stream)  # nor, made on the compute stream, before the gathers wrote it
            with torch.cuda.stream(stream):
                if part.fused:
                    tail = torch.empty(3 + layers, dtype=torch.int64, device=self.device)
                    torch.sum(rows, 1, out=tail[3:])
                    tail[:3].copy_(ids[nb:nb + 3], non_blocking=True)
                else:
                    tail[:3].copy_(dev[nb:])
            part.tail = tail
            gathered = torch.cuda.Event()
            gathered.record(stream)
            wire.wait_event(gathered)
            comm.send(tail.data_ptr(), tail.numel() * 8, 1, wire.cuda_stream)
            part.event = torch.cuda.Event()
            part.event.record(wire)
            if trace:
                trace.gpu(f"sent {len(part.groups)}", wire)
        finally:  # reused once what reads it ran
            self.host_ids.release(ids, stream)
        compute.wait_event(gathered)  # the next kernels on the compute stream cannot overwrite the blocks early

    def recv(self, part: Part, ids_list: array.array, layers: int) -> None:
        """Post the part's receives on the pair's wire stream, all of them before anything
        waits (a scatter never holds back a message), and queue each message's scatter on
        the pair's stream behind its receive."""
        pair, nb = part.pair, len(ids_list)
        stream, wire, comm, ids = pair.stream, pair.wire, pair.comm, None
        with torch.cuda.stream(stream):  # the buffers are allocated on the stream that last reads them
            try:
                ids = self.host_ids.take(ids_list)
                part.bufs = self.bufs.for_part(part.groups, part.heads, nb, part.fused)
                part.tail = torch.empty(3 + layers, dtype=torch.int64, device=self.device)
                wire.wait_stream(stream)  # the buffers' memory is free once the stream got here
                arrived = []
                for buf in [*part.bufs, part.tail]:
                    comm.recv(buf.data_ptr(), buf.numel() * buf.element_size(), 0, wire.cuda_stream)
                    arrived.append(pair.mark(len(arrived), wire))
                sums = torch.empty(layers, dtype=torch.int64, device=self.device)
                fused, mover, trace = part.fused, self.mover, self.trace
                if fused:
                    rows = pair.row_sums(layers, nb, self.device)
                else:
                    idx = ids[:nb].to(self.device, non_blocking=True)
                for i, ((l0, l1), buf) in enumerate(zip(part.groups, part.bufs)):
                    stream.wait_event(arrived[i])
                    if trace:
                        trace.gpu(f"received {i}", stream)
                    if fused:
                        mover.move(ids, l0, l1, part.head, part.heads, buf.view(torch.int32), rows, True, nb, stream)
                    else:
                        self.bufs.scatter(idx, l0, l1, part.head, part.heads, buf)
                        sums[l0:l1] = verify.checksum(buf)
                    if trace:
                        trace.gpu(f"scattered {i}", stream)
                if fused:
                    torch.sum(rows, 1, out=sums)
                stream.wait_event(arrived[-1])
                part.host = torch.empty(3 + 2 * layers, dtype=torch.int64, pin_memory=True)
                part.host[:3 + layers].copy_(part.tail, non_blocking=True)
                part.host[3 + layers:].copy_(sums, non_blocking=True)
                if trace:
                    trace.gpu("tail on host", stream)
            finally:  # whatever was queued must finish before the transfer may end
                stream.wait_stream(wire)
                part.event = torch.cuda.Event()
                part.event.record(stream)
                if ids is not None:
                    self.host_ids.release(ids, stream)
