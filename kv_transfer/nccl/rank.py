"""The per-rank data mover of the NCCL KV transport: RankKV, one per rank process.

A prefill rank holds KV heads [a, b) of every layer, a decode rank heads [c, d). Each
(prefill rank, decode rank) pair whose heads intersect gets its own standalone 2-rank
communicator (index 0 = prefill, the sender; 1 = decode, the receiver): NCCL between
GPUs, called directly (lib.py: one C call per message, on a stream we name), and a
gloo process group on CPU, where the same code path runs in CI. The node decides pairs,
head slices, block ids and keys; RankKV moves the bytes:

- send: for each destination, the layers are cut into groups (layer_groups, computed the
  same way on both ends), each group's [layers, 2, n_blocks, block_size, heads, head_dim]
  is gathered from the blocks into one contiguous buffer and sent as one message (never
  one per block); then a small int64 tail [key, n_blocks, num_layers, checksum per layer].
  On GPU one fused kernel per message gathers it and checksums it in the same pass
  (kernels.py; torch ops where a head is not whole int32 words, and on CPU); it
  reads the block ids from a page-locked host buffer in place (buffers.HostIds).
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
CUDA_MODULE_LOADING=EAGER (set before CUDA starts; it costs start-up time and some
memory per process).

Files: rank_pairs.py (pair lifecycle), rank_cuda.py (GPU path), rank_cpu.py (gloo
path), streams.py (streamed sends), verify.py (message groups, checksums, the tail
check), buffers.py (cache views, message and block-id buffers), state.py, trace.py."""
from __future__ import annotations

import array
import logging
import time

import torch

from . import verify
from .buffers import KVBuffers
from .rank_cpu import recv_cpu, send_cpu
from .rank_cuda import CudaPath
from .rank_pairs import PairOptions, abort, comm_error, open_pair
from .state import Pair, Part, Transfer
from .streams import StreamScheduler, exhaust
from .trace import Trace
from .verify import MAX_MESSAGES, layer_groups

log = logging.getLogger(__name__)


class RankKV:
    """Moves KV heads between this rank's paged cache and its peers, one 2-rank group per pair."""

    def __init__(self, kv, device: torch.device | str, timeout_s: float = 30.0,
                 min_message_bytes: int = 64 << 20, bind_host: str = "127.0.0.1", max_ctas: int = 0,
                 gather_programs: int = 0, min_ctas: int = 0, max_messages: int = MAX_MESSAGES):
        """kv: this rank's engine.kv_cache.KVCache."""
        self.kv = kv
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if kv.k.device != self.device:
            raise ValueError(f"the KV cache is on {kv.k.device}, not {self.device}")
        self.backend = "nccl" if self.cuda else "gloo"
        self.timeout_s, self.min_message_bytes, self.max_messages = timeout_s, min_message_bytes, max_messages
        self.options = PairOptions(self.device, timeout_s, bind_host, max_ctas, min_ctas)
        self.bufs = KVBuffers(kv)
        self._pairs: dict[str, Pair] = {}
        self._pending: list[Transfer] = []
        self._dead: list = []  # aborted groups: destroyed in close(), their destructors may wait
        self._spent: list = []  # settled parts' buffers, dropped at the next poll()
        self._streams = StreamScheduler(self._close)
        self.gpu = CudaPath(self.bufs, self.device, gather_programs) if self.cuda else None
        if self.gpu is not None:
            self.gpu.preload()

    @property
    def trace(self) -> Trace | None:
        """Diagnostics of GPU transfers: set self.gpu.trace to a trace.Trace (never in serving)."""
        return self.gpu.trace if self.gpu is not None else None

    # pairs

    @property
    def pairs(self) -> list[str]:
        return list(self._pairs)

    def link(self, pair: str):
        """The pair's lib.Comm (GPU) or gloo process group (CPU): benchmarks compare
        against raw sends on it."""
        p = self._pairs[pair]
        return p.comm if self.cuda else p.group

    def open_pair(self, pair: str, host: str, port: int, index: int) -> None:
        """Blocking: join the pair through the store at (host, port) as index 0 (sender) or 1
        (receiver); see rank_pairs.open_pair. Replaces an open pair of the same name."""
        if (old := self._pairs.get(pair)) is not None:
            self._close(old, f"pair {pair} was reopened")
        self._pairs[pair] = open_pair(self.options, pair, host, port, index)

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

    def _close(self, pair: Pair, reason: str) -> None:
        if pair.closed:
            return
        pair.closed = reason
        if self._pairs.get(pair.name) is pair:
            del self._pairs[pair.name]
        abort(pair)
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
        trace = self.trace
        if trace:
            trace.host("send entered")
        layers = self.kv.num_layers
        if layer_events is not None and len(layer_events) < layers:
            raise ValueError(f"{len(layer_events)} layer events for {layers} layers")
        tr = self._transfer(key, True, block_ids, layers, dests)
        if trace:
            trace.host("transfer made")
        meta = array.array("q", block_ids)
        meta.extend((key, len(block_ids), layers))  # the tail's head rides with the block ids
        if trace:
            trace.host("block ids listed")
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            if layer_events is None:
                self.gpu.computed.record(compute)  # each pair's stream waits for it
                self._start(tr, "send", lambda part: exhaust(self.gpu.send(part, meta, None, compute)))
            else:
                # nothing runs yet: the first layer_queued() makes the buffers and queues what is due
                self._start(tr, "send", lambda part: self._streams.add(part, self.gpu.send(part, meta, layer_events,
                                                                                           compute)))
            if trace:
                trace.host("send returned")
        else:
            self._start(tr, "send", lambda part: send_cpu(self.bufs, part, torch.frombuffer(meta, dtype=torch.long)
                                                          .clone()))

    def layer_queued(self, layer: int) -> None:
        """Streamed sends (send() with layer_events): layer `layer` is queued on the compute
        stream and its event recorded. Queues the gathers and sends of the layer groups
        that end there, so they leave while the host queues the next layers; the caller
        calls it after each layer, from inside the forward."""
        if self._streams:
            self._streams.run(layer)

    def end_streams(self) -> None:
        """After the forward's last layer_queued(): queue whatever streamed sends still hold
        (on a pair, a transfer behind another one of the same step)."""
        if self._streams:
            self._streams.run(self.kv.num_layers)

    def abort_streams(self, reason: str) -> None:
        """The forward failed before every layer was queued: the streamed sends not fully
        queued fail and their pairs close (the receiver would wait for the rest)."""
        self._streams.abort(reason)

    def recv(self, key: int, block_ids: list[int], srcs: list[tuple[str, int, int]], num_layers: int) -> None:
        """Non-blocking: receive each (pair, head, heads) in srcs into heads [head, head + heads)
        of `block_ids`, all layers. num_layers cross-checks the layout (it must be the cache's)."""
        if num_layers != self.kv.num_layers:
            raise ValueError(f"num_layers {num_layers} != the cache's {self.kv.num_layers}")
        tr = self._transfer(key, False, block_ids, num_layers, srcs)
        if self.cuda:
            idx = array.array("q", block_ids)
            self._start(tr, "recv", lambda part: self.gpu.recv(part, idx, num_layers))
        else:
            self._start(tr, "recv", lambda part: recv_cpu(self.bufs, part, len(block_ids), num_layers))

    def _start(self, tr: Transfer, what: str, begin) -> None:
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

    def _transfer(self, key: int, sending: bool, block_ids: list[int], layers: int, slices) -> Transfer:
        """A transfer with one part per (pair, head, heads); a pair that is not open (closed
        after a failure the node has not seen yet) makes its part fail at the next poll()."""
        want, nb = 0 if sending else 1, self._check_blocks(block_ids)
        tr = Transfer(key, sending, list(block_ids), layers, time.monotonic())
        for name, head, heads in slices:
            if heads < 1 or head < 0 or head + heads > self.kv.kv_heads:
                raise ValueError(f"heads [{head}, {head + heads}) are not within this rank's {self.kv.kv_heads}")
            pair = self._pairs.get(name)
            if pair is not None and pair.index != want:
                raise ValueError(f"pair {name} has index {pair.index}: it cannot {'send' if sending else 'receive'}")
            groups = layer_groups(layers, self.bufs.layer_bytes(nb, heads), self.min_message_bytes, self.max_messages)
            if pair is None:
                gone = Pair(name, want, None, None, None, closed=f"pair {name} is not open")
                tr.parts.append(Part(gone, head, heads, groups, error=gone.closed, settled=True))
            else:
                tr.parts.append(Part(pair, head, heads, groups, self.gpu is not None and self.gpu.fused(head, heads)))
        if not tr.parts:
            raise ValueError("a transfer needs at least one pair")
        return tr

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

    def _advance(self, tr: Transfer, part: Part) -> None:
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
            part.error = comm_error(pair)
        if not part.error and not tr.sending:
            # a tail that names this transfer and checksums that match mean every message
            # arrived whole (the tail is the pair's last, in order); where they do not
            # match, a NCCL error is the likelier cause
            part.error = self._verify(tr, part)
            if part.error and self.cuda and (failed := comm_error(pair)):
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

    def _verify(self, tr: Transfer, part: Part) -> str:
        """Check the tail against the expected key/shape and the received bytes; CPU: scatter."""
        layers = tr.num_layers
        if self.cuda:
            host = part.host.tolist()
            tail, sums = host[:3 + layers], host[3 + layers:]
        else:
            tail = part.tail.tolist()
            sums = torch.cat([verify.checksum(b) for b in part.bufs]).tolist()
        error = verify.check_tail(part.pair.name, tail, sums, tr.key, len(tr.block_ids), layers)
        if not error and not self.cuda:
            idx = torch.tensor(tr.block_ids, dtype=torch.long)
            for (l0, l1), buf in zip(part.groups, part.bufs):
                self.bufs.scatter(idx, l0, l1, part.head, part.heads, buf)
        return error
