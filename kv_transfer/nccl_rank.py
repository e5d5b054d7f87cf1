"""The per-rank data mover of the NCCL KV transport: RankKV, one per rank process.

A prefill rank holds KV heads [a, b) of every layer, a decode rank heads [c, d). Each
(prefill rank, decode rank) pair whose heads intersect gets its own standalone 2-rank
communicator (index 0 = prefill, the sender; 1 = decode, the receiver): NCCL between
GPUs, called directly (nccl_lib: one C call per message, on a stream we name), and a
gloo process group on CPU, where the same code path runs in CI. The node decides pairs,
head slices, block ids and keys; RankKV moves the bytes:

- send: for each destination, the layers are cut into groups (layer_groups, computed the
  same way on both ends), each group's [layers, 2, n_blocks, block_size, heads, head_dim]
  is gathered from the blocks into one contiguous buffer and sent as one message (never
  one per block); then a small int64 tail [key, n_blocks, num_layers, checksum per layer].
  On GPU one fused kernel per message gathers it and checksums it in the same pass
  (nccl_kernels; torch ops where a head is not whole int32 words, and on CPU); it
  reads the block ids from a page-locked host buffer in place (_HostIds).
  On GPU each pair has two streams: the gathers run on its stream, each waiting for the
  event of its group's last layer, so early layers leave while later ones are computed.
  With layer events, send() only registers the transfer (its buffers are made at the
  first layer_queued(), while the device computes that layer, not before the forward's
  first kernel, when the device is idle); the caller reports each layer queued
  (layer_queued, from inside the forward) and each group's gather and send are queued
  then, not after the whole forward; end_streams() after the forward, abort_streams()
  if it failed. On a pair, a transfer's messages are all queued before the next one's;
  the sends run in order on its wire stream, each waiting for its own gather only, so
  gathering message i + 1 overlaps sending message i. The calling (compute) stream waits
  for the last gather before its next kernels: the caller may free the blocks right
  after send() returns (streamed: after end_streams()).
- recv: receives of the same groups into contiguous buffers, then the tail, all posted
  on the wire stream at once; on GPU the scatter of each message into the reserved
  blocks (k and v, at the head offset) and the checksums are queued on the pair's stream
  behind its receive; on CPU they run in poll().
- poll: reports each transfer that ended, once: key -> (ok, error).

Rules the node keeps:
- Order: on each pair, transfers are matched in the order send() and recv() were called
  on the two sides. The node calls them in the same order on both ends; several
  transfers may be queued on one pair. A receiver that expects another key or block
  count sees it in the tail and reports the transfer failed.
- Blocks: a receiver's blocks may be written until poll() reports its key ended (ok or
  failed): keep them reserved until then, never reuse them earlier. There is no cancel;
  a transfer ends by completing, failing or timing out. A failed receive on GPU is only
  reported once nothing queued can still write into its blocks.
- Failures: a NCCL error, or a transfer pending longer than timeout_s, closes (aborts)
  its pair; every other transfer pending on that pair fails too. open_pair() with the
  same name builds a fresh communicator (both sides must call it again).
- layer_events[l] must be recorded (on the compute stream, after layer l was launched)
  before send() is called.

CUDA loads kernels lazily by default, and loading one waits for the kernels running on
the device, a NCCL receive spinning until its peer sends included: the first launch of
any new kernel in the process (ours or the engine's) can then block the host until a
pending transfer's data comes, for ever if its peer died. RankKV launches its own
kernels once when it is made; rank processes should also run with
CUDA_MODULE_LOADING=EAGER (set before CUDA starts; about 2 s and 0.6 GiB more per process
on an H200 with torch 2.11)."""
from __future__ import annotations

import array
import ctypes
import datetime
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from . import nccl_lib
from .nccl_store import connect_store

try:  # the fused gather/scatter + checksum kernels (GPU); torch ops where Triton is missing
    from . import nccl_kernels as kernels
except ImportError:
    kernels = None

if TYPE_CHECKING:
    from pdserve.engine.kv_cache import KVCache

log = logging.getLogger(__name__)

_WARMUP = 0x6B76  # the warm-up message's value, checked by the receiver


MAX_MESSAGES = 8  # per transfer and pair: each message costs the host ~0.1 ms to issue (measured, H200)


def layer_groups(num_layers: int, bytes_per_layer: int, min_message_bytes: int,
                 max_messages: int = MAX_MESSAGES) -> list[tuple[int, int]]:
    """Consecutive layer ranges [start, end), one message each: as many groups as keep every
    group at >= min_message_bytes (one group when the whole KV is smaller) and their number
    at most max_messages. From three groups on, the first and the last are the smallest
    allowed and the others even (sizes differing by at most one layer): the first gather
    and the last scatter, which nothing overlaps, stay short, and so does what is left to
    send after the last layer of a streamed prefill. Each message costs host time, so a
    large KV goes in a few large ones. A pure function of its arguments: both ends
    compute the same."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    per = max(1, -(-min_message_bytes // max(1, bytes_per_layer)))
    n = max(1, min(num_layers // per, max_messages))
    if n < 3:
        return _even(0, num_layers, n)
    return [(0, per), *_even(per, num_layers - per, n - 2), (num_layers - per, num_layers)]


def _even(start: int, end: int, n: int) -> list[tuple[int, int]]:
    base, extra = divmod(end - start, n)
    out = []
    for i in range(n):
        out.append((start, start + base + (i < extra)))
        start = out[-1][1]
    return out


def checksum(buf: torch.Tensor) -> torch.Tensor:
    """int64 [layers] of a gathered [layers, 2, n_blocks, ...] buffer, on its device: per
    layer, the sum over its k/v block rows of (row index + 1) x (the row's int32 words
    summed mod 2**32). One read of the buffer; it catches a wrong, truncated or misordered
    message, blocks in the wrong order and k swapped with v."""
    layers = buf.shape[0]
    rows = buf.reshape(layers * buf.shape[1] * buf.shape[2], -1)
    width = rows.shape[1] * rows.element_size()
    words = rows.view(torch.int32 if width % 4 == 0 else torch.int16 if width % 2 == 0 else torch.uint8)
    sums = words.sum(1, dtype=words.dtype).to(torch.int64).view(layers, -1)  # no int64 copy of the buffer
    weights = torch.arange(1, sums.shape[1] + 1, dtype=torch.int64, device=buf.device)
    return (sums * weights).sum(1)


class _Waiter:
    """gloo only: its send/recv works report completion only through wait(), so a thread
    per pair waits for them in order and records each outcome ("" ok, else the error).
    It keeps no work once waited: a gloo work left alive in a thread when the process
    exits makes it abort."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"kv-wait-{name}", daemon=True)
        self.thread.start()

    def add(self, work, part: _Part) -> None:
        part.status.append(None)
        self._queue.put((work, part, len(part.status) - 1))

    def stop(self) -> None:
        self._queue.put(None)  # after the works queued so far (each ends: done, failed or gloo's timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, part, i = item
            del item
            try:
                work.wait()
                part.status[i] = ""
            except Exception as e:  # noqa: BLE001 - any failure of the work is its outcome
                part.status[i] = f"{type(e).__name__}: {e}"
            del work, part


class Trace:
    """Diagnostics (benchmarks/kv_transfer.py --diag): the steps of GPU transfers, each as a
    host time (time.perf_counter: CLOCK_MONOTONIC, one clock for every process of the
    host) or a CUDA event, converted to that clock by report(). Set RankKV.trace to one;
    it adds an event per step, so it is never on in serving."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, float | None, torch.cuda.Event | None]] = []

    def host(self, label: str) -> None:
        self.marks.append((label, time.perf_counter(), None))

    def gpu(self, label: str, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.marks.append((label, None, event))

    def report(self) -> list[tuple[str, float]]:
        """(label, host seconds) of every mark so far, in the order made; clears them. A GPU
        mark's time is a reference event's host time (recorded on an idle stream, spun on
        until it completed: within a few microseconds) minus its GPU time before it."""
        torch.cuda.synchronize(self.device)
        ref = torch.cuda.Event(enable_timing=True)
        ref.record(torch.cuda.Stream(self.device))
        while not ref.query():
            pass
        now = time.perf_counter()
        out = [(label, t if event is None else now - event.elapsed_time(ref) / 1e3) for label, t, event in self.marks]
        self.marks.clear()
        return out


@dataclass(eq=False)
class _Pair:
    name: str
    index: int                        # 0 sends (prefill), 1 receives (decode)
    group: Any                        # CPU: ProcessGroupGloo
    stream: torch.cuda.Stream | None  # GPU: the pair's gather/scatter stream
    waiter: _Waiter | None            # CPU
    closed: str = ""                  # why it was closed; "" while open
    comm: nccl_lib.Comm | None = None      # GPU: the pair's NCCL communicator
    wire: torch.cuda.Stream | None = None  # GPU: its sends or receives, in order
    rows: torch.Tensor | None = None  # GPU, fused: the row sums, reused by every transfer (stream order)
    marks: list[torch.cuda.Event] = field(default_factory=list)  # GPU: per message, reused (see mark())

    def row_sums(self, layers: int, nb: int, device: torch.device) -> torch.Tensor:
        """[layers, 2 * nb] int64 for the fused kernels' row sums: one buffer per pair, grown
        when needed, used only on the pair's stream (one transfer after another)."""
        if self.rows is None or self.rows.numel() < layers * 2 * nb:
            # made on the pair's stream, whatever stream is current: memory the caching
            # allocator hands out on the compute stream can still be in use by queued layers
            # (a streamed send is prepared before its forward runs), and the old buffer,
            # freed here, goes back to the pair's stream, behind its last reader
            with torch.cuda.stream(self.stream):
                self.rows = torch.empty(max(layers * 2 * nb, 1 << 16), dtype=torch.int64, device=device)
        return self.rows[:layers * 2 * nb].view(layers, 2 * nb)

    def mark(self, i: int, on: torch.cuda.Stream) -> torch.cuda.Event:
        """The pair's i-th event, recorded on `on` now. The events are reused by every
        transfer: a wait takes an event's last record at the time the wait is queued, so
        recording it again later cannot change an earlier wait."""
        while len(self.marks) <= i:
            self.marks.append(torch.cuda.Event())
        self.marks[i].record(on)
        return self.marks[i]


@dataclass(eq=False)
class _Part:
    """One pair's share of a transfer: its heads, messages and their state."""
    pair: _Pair
    head: int                                  # first local head on this rank
    heads: int
    groups: list[tuple[int, int]]
    fused: bool = False                        # its messages move through the fused kernels
    bufs: list[torch.Tensor] = field(default_factory=list)
    status: list[str | None] = field(default_factory=list)  # CPU: per work, set by the waiter
    tail: torch.Tensor | None = None
    host: torch.Tensor | None = None           # GPU recv: pinned copy of [tail..., local checksums...]
    event: torch.cuda.Event | None = None      # GPU: send: after the tail left; recv: after the scatter and the copy to host
    error: str = ""
    settled: bool = False
    streaming: bool = False                    # GPU send: some of its messages wait for layers still to be queued


@dataclass(eq=False)
class _Transfer:
    key: int
    sending: bool
    block_ids: list[int]
    num_layers: int
    started: float
    parts: list[_Part] = field(default_factory=list)
    error: str = ""


class _HostIds:
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


class RankKV:
    """Moves KV heads between this rank's paged cache and its peers, one 2-rank group per pair."""

    def __init__(self, kv: KVCache, device: torch.device | str, timeout_s: float = 30.0,
                 min_message_bytes: int = 64 << 20, bind_host: str = "127.0.0.1", max_ctas: int = 0,
                 gather_programs: int = 0, min_ctas: int = 0, max_messages: int = MAX_MESSAGES):
        self.kv = kv
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if kv.k.device != self.device:
            raise ValueError(f"the KV cache is on {kv.k.device}, not {self.device}")
        self.backend = "nccl" if self.cuda else "gloo"
        self.timeout_s, self.min_message_bytes = timeout_s, min_message_bytes
        self.max_ctas = max_ctas  # NCCL: at most this many CTAs (SMs) per pair communicator; 0 = NCCL's choice
        self.min_ctas = min_ctas  # NCCL: at least this many; 0 = NCCL's choice
        self.max_messages = max_messages
        self.bind_host = bind_host  # gloo's listening address
        self._pairs: dict[str, _Pair] = {}
        self._pending: list[_Transfer] = []
        self._dead: list = []  # aborted groups: destroyed in close(), their destructors may wait
        self.trace: Trace | None = None  # diagnostics only (see Trace)
        self._spent: list = []  # settled parts' buffers, dropped at the next poll()
        # the fused kernels (nccl_kernels) where Triton is there; gather_programs caps their grid
        self._mover = kernels.Mover(kv.k, kv.v, gather_programs) if self.cuda and kernels is not None else None
        self._computed = torch.cuda.Event() if self.cuda else None  # send(): the compute stream up to now
        self._host_ids = _HostIds() if self.cuda else None
        self._fused_heads: dict[tuple[int, int], bool] = {}
        self._streams: list[list] = []  # GPU: [part, its send generator, the layer it waits for], in send() order
        if self.cuda:
            self._preload_kernels()

    def _preload_kernels(self) -> None:
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
                        buf = self._gather(idx, l0, l1, head, heads)
                        sums = torch.empty(layers + 3, dtype=torch.int64, device=self.device)
                        for start in range(4):  # every alignment of a slice of the checksums
                            sums[start:start + l1 - l0] = checksum(buf)
                        self._scatter(idx, l0, l1, head, heads, buf, scratch)
                head3 = torch.tensor([1, 2, 3], dtype=torch.int64).pin_memory()
                tail = torch.cat((head3.to(self.device, non_blocking=True), sums))
                host = torch.empty(2 * tail.numel(), dtype=torch.int64, pin_memory=True)
                host[:tail.numel()].copy_(tail, non_blocking=True)
        if kernels is not None:
            kernels.preload(k, list(range(1, kv.kv_heads + 1)))
        torch.cuda.synchronize(self.device)

    # pairs

    @property
    def pairs(self) -> list[str]:
        return list(self._pairs)

    def link(self, pair: str):
        """The pair's nccl_lib.Comm (GPU) or gloo process group (CPU): benchmarks compare
        against raw sends on it."""
        p = self._pairs[pair]
        return p.comm if self.cuda else p.group

    def open_pair(self, pair: str, host: str, port: int, index: int) -> None:
        """Blocking: build the pair's 2-rank communicator through the store at (host, port),
        index 0 on the prefill (sending) side, 1 on the decode side, and exchange one tiny
        message so its connection exists before the first transfer. Replaces an open pair
        of the same name. Raises on failure, or when the peer does not come within timeout_s."""
        if index not in (0, 1):
            raise ValueError(f"pair index must be 0 (sender) or 1 (receiver), got {index}")
        if (old := self._pairs.get(pair)) is not None:
            self._close(old, f"pair {pair} was reopened")
        deadline = time.monotonic() + self.timeout_s
        base = PrefixStore(f"pdserve-kv/{pair}/", connect_store(host, port, self.timeout_s))
        store = PrefixStore(f"{_meet(base, index, deadline, pair)}/", base)  # fresh keys for every opening
        if self.cuda:
            p = _Pair(pair, index, None, torch.cuda.Stream(self.device, priority=-1), None,
                      comm=self._new_comm(store, index, deadline, pair), wire=torch.cuda.Stream(self.device, priority=-1))
        else:
            p = _Pair(pair, index, self._new_group(store, index), None, _Waiter(pair))
        try:
            self._warm_up(p, deadline)
        except BaseException:
            _abort(p)
            if p.waiter is not None:
                p.waiter.stop()
            raise
        self._pairs[pair] = p

    def close_pair(self, pair: str) -> None:
        """Abort the pair's communicator (NCCL: no kernel keeps spinning on a dead peer); its
        pending transfers fail."""
        if (p := self._pairs.get(pair)) is not None:
            self._close(p, f"pair {pair} was closed")

    def close(self) -> None:
        """Close every pair. gloo: waits (up to timeout_s) for the threads waiting on works."""
        self._spent.clear()
        closing = list(self._pairs.values())
        for p in closing:
            self._close(p, f"pair {p.name} was closed")
        deadline = time.monotonic() + self.timeout_s
        for p in closing:
            if p.waiter is not None:
                p.waiter.thread.join(max(0.0, deadline - time.monotonic()))
        self._dead.clear()

    def _new_comm(self, store, index: int, deadline: float, pair: str) -> nccl_lib.Comm:
        """The pair's NCCL communicator: the sender draws its unique id, the receiver reads it
        from the store (128 bytes, under this opening's fresh prefix)."""
        if index == 0:
            store.set("nccl-id", nccl_lib.unique_id())
        while not store.check(["nccl-id"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pair {pair}: the sender's NCCL id did not come")
            time.sleep(0.002)
        uid = store.get("nccl-id")
        min_ctas, max_ctas = 0, 0
        if self.max_ctas > 0:
            # a receive spins on its SMs until the data comes (for a streamed prefill, the
            # whole forward): fewer CTAs leave more SMs to the compute beside it
            min_ctas, max_ctas = 1, self.max_ctas
        if self.min_ctas > 0:  # NCCL wants both bounds set
            min_ctas, max_ctas = self.min_ctas, max(self.min_ctas, self.max_ctas if self.max_ctas > 0 else 64)
        with torch.cuda.device(self.device):
            return nccl_lib.Comm(uid, 2, index, min_ctas, max_ctas)

    def _new_group(self, store, index: int):
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.bind_host)]
        opts._timeout = datetime.timedelta(seconds=self.timeout_s)
        opts._threads = 2
        return dist.ProcessGroupGloo(store, index, 2, opts)

    def _warm_up(self, pair: _Pair, deadline: float) -> None:
        """One int64 from sender to receiver: NCCL connects the pair now, not at its first transfer."""
        if pair.index == 0:
            t = torch.tensor([_WARMUP], dtype=torch.int64, device=self.device)
        else:
            t = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.cuda:
            pair.wire.wait_stream(torch.cuda.current_stream(self.device))
            if pair.index == 0:
                pair.comm.send(t.data_ptr(), 8, 1, pair.wire.cuda_stream)
            else:
                pair.comm.recv(t.data_ptr(), 8, 0, pair.wire.cuda_stream)
            done = torch.cuda.Event()
            done.record(pair.wire)
            while not done.query():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pair {pair.name}: the warm-up message did not complete in {self.timeout_s:g} s")
                time.sleep(0.001)
            if (code := pair.comm.async_error()) != nccl_lib.SUCCESS:
                raise nccl_lib.NcclError(f"pair {pair.name}: the warm-up message", code)
        else:
            work = pair.group.send([t], 1, 0) if pair.index == 0 else pair.group.recv([t], 0, 0)
            work.wait(datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
        if pair.index == 1 and int(t.item()) != _WARMUP:
            raise RuntimeError(f"pair {pair.name}: the warm-up message held {int(t.item())}, expected {_WARMUP}")

    def _close(self, pair: _Pair, reason: str) -> None:
        if pair.closed:
            return
        pair.closed = reason
        if self._pairs.get(pair.name) is pair:
            del self._pairs[pair.name]
        _abort(pair)
        if pair.group is not None:
            self._dead.append(pair.group)
        if pair.waiter is not None:
            pair.waiter.stop()
        for tr in self._pending:
            for part in tr.parts:
                if part.pair is pair and not part.settled and not part.error:
                    part.error = reason

    # transfers

    def send(self, key: int, block_ids: list[int], dests: list[tuple[str, int, int]],
             layer_events: list[torch.cuda.Event] | None = None) -> None:
        """Non-blocking: send heads [head, head + heads) of `block_ids`, all layers, to each
        (pair, head, heads) in dests. See the module docstring for streams and events."""
        if self.trace:
            self.trace.host("send entered")
        layers = self.kv.num_layers
        if layer_events is not None and len(layer_events) < layers:
            raise ValueError(f"{len(layer_events)} layer events for {layers} layers")
        tr = self._transfer(key, True, block_ids, layers, dests)
        if self.trace:
            self.trace.host("transfer made")
        meta = array.array("q", block_ids)
        meta.extend((key, len(block_ids), layers))  # the tail's head rides with the block ids
        if self.trace:
            self.trace.host("block ids listed")
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            if layer_events is None:
                self._computed.record(compute)  # each pair's stream waits for it (one event, reused)
                self._start(tr, "send", lambda part: _exhaust(self._send_cuda(part, meta, None, compute)))
            else:
                # nothing runs yet: the first layer_queued() makes the buffers and queues what is due
                self._start(tr, "send", lambda part: self._stream(part, self._send_cuda(part, meta, layer_events,
                                                                                           compute)))
            if self.trace:
                self.trace.host("send returned")
        else:
            self._start(tr, "send", lambda part: self._send_cpu(part, torch.frombuffer(meta, dtype=torch.long).clone()))

    def layer_queued(self, layer: int) -> None:
        """Streamed sends (send() with layer_events): layer `layer` is queued on the compute
        stream and its event recorded. Queues the gathers and sends of the layer groups
        that end there, so they leave while the host queues the next layers; the caller
        calls it after each layer, from inside the forward."""
        if self._streams:
            self._run_streams(layer)

    def end_streams(self) -> None:
        """After the forward's last layer_queued(): queue whatever streamed sends still hold
        (on a pair, a transfer behind another one of the same step)."""
        if self._streams:
            self._run_streams(self.kv.num_layers)

    def abort_streams(self, reason: str) -> None:
        """The forward failed before every layer was queued: the streamed sends not fully
        queued fail and their pairs close (the receiver would wait for the rest)."""
        streams, self._streams = self._streams, []
        for part, gen, _ in streams:
            gen.close()
            part.streaming = False
            part.error = part.error or reason
            self._close(part.pair, part.error)

    def _stream(self, part: _Part, gen) -> None:
        part.streaming = True
        self._streams.append([part, gen, -1])

    def _run_streams(self, layer: int) -> None:
        """Advance each streamed send while the layer its next group waits for is queued
        (<= layer), in send() order. On a pair only the oldest unfinished transfer advances:
        its messages must all precede the next transfer's, as the receiver posts them."""
        busy, keep = set(), []
        for entry in self._streams:
            part, gen = entry[0], entry[1]
            pair = part.pair
            if pair.closed:  # the part fails at the next poll()
                gen.close()
                part.streaming = False
                continue
            if pair.name in busy:
                keep.append(entry)
                continue
            try:
                while entry[2] is not None and entry[2] <= layer:
                    entry[2] = next(gen, None)
            except Exception as e:  # noqa: BLE001 - reported through poll(), as any transfer failure
                log.exception("KV send on pair %s failed", pair.name)
                part.streaming = False
                part.error = f"send failed on pair {pair.name}: {type(e).__name__}: {e}"
                self._close(pair, part.error)
                continue
            if entry[2] is None:
                part.streaming = False
            else:
                busy.add(pair.name)
                keep.append(entry)
        self._streams = keep

    def recv(self, key: int, block_ids: list[int], srcs: list[tuple[str, int, int]], num_layers: int) -> None:
        """Non-blocking: receive each (pair, head, heads) in srcs into heads [head, head + heads)
        of `block_ids`, all layers. num_layers cross-checks the layout (it must be the cache's)."""
        if num_layers != self.kv.num_layers:
            raise ValueError(f"num_layers {num_layers} != the cache's {self.kv.num_layers}")
        tr = self._transfer(key, False, block_ids, num_layers, srcs)
        if self.cuda:
            idx = array.array("q", block_ids)
            self._start(tr, "recv", lambda part: self._recv_cuda(part, idx, num_layers))
        else:
            self._start(tr, "recv", lambda part: self._recv_cpu(part, len(block_ids), num_layers))

    def _start(self, tr: _Transfer, what: str, begin) -> None:
        """Queue every unsettled part of tr with begin(part), then track tr. A part that
        fails to queue leaves its pair out of step: the pair closes and the part fails,
        which the caller hears from poll()."""
        for part in tr.parts:
            if part.settled:
                continue
            try:
                begin(part)
            except Exception as e:  # noqa: BLE001 - reported through poll(), as any transfer failure
                log.exception("KV %s %d on pair %s failed", what, tr.key, part.pair.name)
                part.error = f"{what} failed on pair {part.pair.name}: {type(e).__name__}: {e}"
                self._close(part.pair, part.error)
        self._pending.append(tr)

    def _check_blocks(self, block_ids: list[int]) -> int:
        n = len(block_ids)
        if n == 0 or len(set(block_ids)) != n or min(block_ids) < 0 or max(block_ids) >= self.kv.num_blocks:
            raise ValueError(f"block ids must be distinct, in [0, {self.kv.num_blocks}) and not empty")
        return n

    def _transfer(self, key: int, sending: bool, block_ids: list[int], layers: int, slices) -> _Transfer:
        """A transfer with one part per (pair, head, heads); a pair that is not open (closed
        after a failure the node has not seen yet) makes its part fail at the next poll()."""
        want, nb = 0 if sending else 1, self._check_blocks(block_ids)
        tr = _Transfer(key, sending, list(block_ids), layers, time.monotonic())
        for name, head, heads in slices:
            if heads < 1 or head < 0 or head + heads > self.kv.kv_heads:
                raise ValueError(f"heads [{head}, {head + heads}) are not within this rank's {self.kv.kv_heads}")
            pair = self._pairs.get(name)
            if pair is not None and pair.index != want:
                raise ValueError(f"pair {name} has index {pair.index}: it cannot {'send' if sending else 'receive'}")
            groups = layer_groups(layers, self._layer_bytes(nb, heads), self.min_message_bytes, self.max_messages)
            if pair is None:
                gone = _Pair(name, want, None, None, None, closed=f"pair {name} is not open")
                tr.parts.append(_Part(gone, head, heads, groups, error=gone.closed, settled=True))
            else:
                tr.parts.append(_Part(pair, head, heads, groups, self._fused(head, heads)))
        if not tr.parts:
            raise ValueError("a transfer needs at least one pair")
        return tr

    def _layer_bytes(self, nb: int, heads: int) -> int:
        kv = self.kv
        return 2 * nb * kv.block_size * heads * kv.head_dim * kv.k.element_size()

    def _gather(self, idx: torch.Tensor, l0: int, l1: int, head: int, heads: int) -> torch.Tensor:
        """[l1 - l0, 2, n_blocks, block_size, heads, head_dim] of (k, v), contiguous."""
        k, v = self.kv.k, self.kv.v
        buf = torch.empty((l1 - l0, 2, len(idx), k.shape[2], heads, k.shape[4]), dtype=k.dtype, device=k.device)
        for src, i in ((k, 0), (v, 1)):
            torch.index_select(_wide(src[l0:l1, :, :, head:head + heads]), 1, idx, out=_wide(buf[:, i]))
        return buf

    def _scatter(self, idx: torch.Tensor, l0: int, l1: int, head: int, heads: int, buf: torch.Tensor,
                 into: list[torch.Tensor] | None = None) -> None:
        for dst, i in zip(into or (self.kv.k, self.kv.v), (0, 1)):
            _wide(dst[l0:l1, :, :, head:head + heads]).index_copy_(1, idx, _wide(buf[:, i]))

    def _fused(self, head: int, heads: int) -> bool:
        """Whether messages of these heads move through the fused kernels (nccl_kernels)."""
        fused = self._fused_heads.get((head, heads))
        if fused is None:
            fused = self._fused_heads[(head, heads)] = self._mover is not None and kernels.supported(self.kv.k, head,
                                                                                                      heads)
        return fused

    def _send_cuda(self, part: _Part, meta: array.array, layer_events, compute):
        """A generator: queues the part's gathers on the pair's stream and its sends on the
        pair's wire stream, each send behind its own gather only. With layer_events it
        yields, before each group, the last layer that group needs (run by _run_streams as
        the forward queues the layers); without, it runs through at once. Only what the
        first message needs comes before its send: where the KV is already computed, the
        host time spent here before it is time the link stands idle."""
        pair, layers, trace, nb = part.pair, self.kv.num_layers, self.trace, len(meta) - 3
        stream, wire, comm = pair.stream, pair.wire, pair.comm
        ids = self._host_ids.take(meta)  # [block ids..., key, n_blocks, num_layers], page-locked
        try:
            if layer_events is None:
                stream.wait_event(self._computed)  # recorded by send() on the compute stream
            sizes = [self._layer_bytes(nb, part.heads) * (l1 - l0) for l0, l1 in part.groups]
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
            part.bufs.append(whole)  # freed only once nothing queued can touch it (see _advance)
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
                if part.fused and self._mover.launch(ids_ptr, at, rows_ptr, l0, l1, part.head, part.heads, False, nb,
                                                     handle):
                    pass  # launched by address: no torch call before the send
                elif part.fused:
                    buf = whole[start // self.kv.k.element_size():(start + sizes[i]) // self.kv.k.element_size()]
                    self._mover.move(ids, l0, l1, part.head, part.heads, buf.view(torch.int32), rows, False, nb, stream)
                else:
                    buf = whole[start // self.kv.k.element_size():(start + sizes[i]) // self.kv.k.element_size()]
                    with torch.cuda.stream(stream):
                        buf.copy_(self._gather(dev[:nb], l0, l1, part.head, part.heads).view(-1))
                        tail[3 + l0:3 + l1] = checksum(buf.view(l1 - l0, 2, nb, -1))
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
            self._host_ids.release(ids, stream)
        compute.wait_event(gathered)  # the next kernels on the compute stream cannot overwrite the blocks early

    def _send_cpu(self, part: _Part, meta: torch.Tensor) -> None:
        group, layers, nb = part.pair.group, self.kv.num_layers, len(meta) - 3
        idx, tail = meta[:nb], torch.empty(3 + layers, dtype=torch.int64)
        tail[:3] = meta[nb:]
        for l0, l1 in part.groups:
            buf = self._gather(idx, l0, l1, part.head, part.heads)
            tail[3 + l0:3 + l1] = checksum(buf)
            part.pair.waiter.add(group.send([buf], 1, 0), part)
        part.tail = tail
        part.pair.waiter.add(group.send([tail], 1, 0), part)

    def _empty_buf(self, layers: int, nb: int, heads: int) -> torch.Tensor:
        k = self.kv.k
        return torch.empty((layers, 2, nb, k.shape[2], heads, k.shape[4]), dtype=k.dtype, device=k.device)

    def _flat_buf(self, layers: int, nb: int, heads: int) -> torch.Tensor:
        """A fused message's buffer: the same bytes as _empty_buf's, one dimension (NCCL
        matches a send with its receive by bytes; both ends use the cache's dtype)."""
        k = self.kv.k
        return torch.empty(layers * 2 * nb * k.shape[2] * heads * k.shape[4], dtype=k.dtype, device=self.device)

    def _empty_bufs(self, part: _Part, nb: int) -> list[torch.Tensor]:
        new = self._flat_buf if part.fused else self._empty_buf
        return [new(l1 - l0, nb, part.heads) for l0, l1 in part.groups]

    def _recv_cuda(self, part: _Part, ids_list: array.array, layers: int) -> None:
        """Post the part's receives on the pair's wire stream, all of them before anything
        waits (a scatter never holds back a message), and queue each message's scatter on
        the pair's stream behind its receive."""
        pair, nb = part.pair, len(ids_list)
        stream, wire, comm, ids = pair.stream, pair.wire, pair.comm, None
        with torch.cuda.stream(stream):  # the buffers are allocated on the stream that last reads them
            try:
                ids = self._host_ids.take(ids_list)
                part.bufs = self._empty_bufs(part, nb)
                part.tail = torch.empty(3 + layers, dtype=torch.int64, device=self.device)
                wire.wait_stream(stream)  # the buffers' memory is free once the stream got here
                arrived = []
                for buf in [*part.bufs, part.tail]:
                    comm.recv(buf.data_ptr(), buf.numel() * buf.element_size(), 0, wire.cuda_stream)
                    arrived.append(pair.mark(len(arrived), wire))
                sums = torch.empty(layers, dtype=torch.int64, device=self.device)
                fused, mover, trace = part.fused, self._mover, self.trace
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
                        self._scatter(idx, l0, l1, part.head, part.heads, buf)
                        sums[l0:l1] = checksum(buf)
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
                    self._host_ids.release(ids, stream)

    def _recv_cpu(self, part: _Part, nb: int, layers: int) -> None:
        group, waiter = part.pair.group, part.pair.waiter
        part.bufs = self._empty_bufs(part, nb)
        part.tail = torch.empty(3 + layers, dtype=torch.int64)
        for b in [*part.bufs, part.tail]:
            waiter.add(group.recv([b], 0, 0), part)

    # completion

    def poll(self) -> dict[int, tuple[bool, str]]:
        """Non-blocking: key -> (ok, error) for every transfer that ended since the last
        call. A transfer pending longer than timeout_s closes its pairs and fails."""
        self._spent.clear()
        now, out, still = time.monotonic(), {}, []
        for tr in self._pending:
            for part in tr.parts:
                if not part.settled:
                    self._advance(tr, part)
            if now - tr.started > self.timeout_s and not all(p.settled for p in tr.parts):
                reason = f"timed out after {self.timeout_s:g} s (transfer {tr.key})"
                tr.error = tr.error or reason
                for part in tr.parts:
                    if not part.settled:
                        self._close(part.pair, f"pair {part.pair.name}: a transfer {reason}")
                        self._advance(tr, part)
            if not all(p.settled for p in tr.parts) or tr.key in out:
                still.append(tr)
                continue
            errors = [tr.error] if tr.error else [p.error for p in tr.parts if p.error]
            out[tr.key] = (not errors, "; ".join(dict.fromkeys(errors)))
        self._pending = still
        return out

    def _advance(self, tr: _Transfer, part: _Part) -> None:
        """Settle the part once nothing of it is in flight that could still touch its blocks."""
        pair = part.pair
        if self.cuda and not tr.sending:
            if part.event is not None and not part.event.query():
                return  # a queued scatter may still write the blocks, even after an abort
            if self.trace:
                self.trace.host("receive seen ended")
        elif self.cuda:  # the event follows the tail's send on the wire stream
            if not pair.closed and (part.streaming or part.event is not None and not part.event.query()):
                return
        else:
            failed = [s for s in part.status if s]
            if not pair.closed and not failed and None in part.status:
                return
            if failed and not part.error:
                part.error = f"pair {pair.name}: {failed[0]}"
        if pair.closed and not part.error:
            part.error = pair.closed
        if self.cuda and not part.error and tr.sending:
            part.error = _comm_error(pair)
        if not part.error and not tr.sending:
            # a tail that names this transfer and checksums that match mean every message
            # arrived whole (the tail is the pair's last, in order); where they do not
            # match, a NCCL error is the likelier cause
            part.error = self._verify(tr, part)
            if part.error and self.cuda and (failed := _comm_error(pair)):
                part.error = failed
                self._close(pair, failed)
        elif part.error:
            self._close(pair, part.error)  # the pair is out of step or broken
        part.settled = True
        # freed at the next poll(): dropping a transfer's buffers costs the host
        # tens of microseconds, which the caller would wait for before hearing it ended
        self._spent.append((part.bufs, part.tail, part.host))
        part.bufs, part.tail, part.host = [], None, None
        if self.trace:
            self.trace.host("settled")

    def _verify(self, tr: _Transfer, part: _Part) -> str:
        """Check the tail against the expected key/shape and the received bytes; CPU: scatter."""
        layers = tr.num_layers
        if self.cuda:
            host = part.host.tolist()
            tail, sums = host[:3 + layers], host[3 + layers:]
        else:
            tail = part.tail.tolist()
            sums = torch.cat([checksum(b) for b in part.bufs]).tolist()
        want = [tr.key, len(tr.block_ids), layers]
        if tail[:3] != want:
            return (f"pair {part.pair.name}: the tail says key {tail[0]}, {tail[1]} blocks, {tail[2]} layers; "
                    f"expected key {want[0]}, {want[1]} blocks, {want[2]} layers")
        bad = [i for i in range(layers) if sums[i] != tail[3 + i]]
        if bad:
            return f"pair {part.pair.name}: checksum mismatch in layers {bad}"
        if not self.cuda:
            idx = torch.tensor(tr.block_ids, dtype=torch.long)
            for (l0, l1), buf in zip(part.groups, part.bufs):
                self._scatter(idx, l0, l1, part.head, part.heads, buf)
        return ""


def _exhaust(gen) -> None:
    for _ in gen:
        raise RuntimeError("a send without layer events waited for a layer")


_WIDE = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _wide(t: torch.Tensor) -> torch.Tensor:
    """The same bytes viewed with the widest element that divides a head (head_dim x itemsize
    bytes, every offset here a multiple of it): the index kernels move 16 bytes per
    element instead of 2, several times faster for bfloat16, bit for bit the same."""
    width = t.shape[-1] * t.element_size()
    return t.view(next(dt for w, dt in _WIDE.items() if width % w == 0))


def _comm_error(pair: _Pair) -> str:
    """The pair's asynchronous NCCL error, "" if none (GPU)."""
    try:
        code = pair.comm.async_error() if pair.comm is not None else nccl_lib.SUCCESS
    except nccl_lib.NcclError as e:
        return f"pair {pair.name}: {e}"
    if code in (nccl_lib.SUCCESS, nccl_lib.IN_PROGRESS):
        return ""
    return f"pair {pair.name}: {nccl_lib.NcclError('asynchronous error', code)}"


def _meet(store, index: int, deadline: float, pair: str) -> str:
    """Both sides of a pair agree on a fresh key prefix for this opening: each publishes a
    nonce and acknowledges the other's; done when the peer acknowledged our current one.
    Keys left by an earlier opening (a dead peer's) never match, so they cannot be joined."""
    mine, me, peer = uuid.uuid4().hex[:16], str(index), str(1 - index)
    store.set(f"hello/{me}", mine)
    acked = None
    while True:
        if store.check([f"hello/{peer}"]):
            other = store.get(f"hello/{peer}").decode()
            if other != acked:
                store.set(f"ack/{me}", f"{mine}:{other}")
                acked = other
            if store.check([f"ack/{peer}"]) and store.get(f"ack/{peer}").decode() == f"{other}:{mine}":
                return f"{mine}.{other}" if index == 0 else f"{other}.{mine}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"pair {pair}: the peer (index {1 - index}) did not come")
        time.sleep(0.005)


def _abort(pair: _Pair) -> None:
    """Abort a pair's communicator or group, quietly: NCCL stops its kernels; gloo closes what it can."""
    try:
        if pair.comm is not None:
            pair.comm.abort()
        elif pair.group is not None:
            pair.group.abort()
    except Exception:  # noqa: BLE001 - closing must not fail
        log.warning("aborting KV pair %s failed", pair.name, exc_info=True)
