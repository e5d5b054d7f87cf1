"""NcclKVManager: the KV data plane over NCCL (gloo where there is no GPU), one per
node and role.

Data: one 2-rank communicator per (prefill rank, decode rank) pair that shares KV
heads; kv_transfer.nccl_rank.RankKV moves the heads in each rank process, driven
through the engine (LLMEngine.kv_*). A prefill rank gathers a layer group's blocks
into one buffer once that group's layers are computed and sends it while the
forward goes on; a decode rank receives into buffers, scatters into the reserved
blocks and checks per-layer checksums.

Control: the ZeroMQ sockets of the ZeroMQ transport carry two small KVHeader
messages per transfer, prefill -> decode. The announce (all layers, no frames) is
queued by the prefill engine thread right before the step that issues the sends,
so announces and sends keep one order per pair: the decode side posts receives in
announce order. The finish (last=True) carries the first token. A transfer is DONE
on the decode side once every rank reported its layers received and verified and
the first token came; on the prefill side once every rank's sends completed and the
finish was queued. Errors go back as a KVAck.

Pair sets: a prefill node opens one set per decode node the coordinator lists,
before any request: OpenKVPairs on the decode node checks the protocol version and
compat hash and answers where its rendezvous store listens, then both nodes' ranks
join the pairs. A pair whose transfer timed out is aborted by RankKV; the failure
marks its set broken, and the next peer update opens a new set (new name).

Blocks and NCCL: a posted receive writes into its blocks until RankKV reports it
ended, so a receiver that fails or is cancelled after its announce only ends (and
lets its owner free the blocks) once its receives ended. Cancelled before the
announce, it waits for whichever comes first: the announce (the sends were already
issued: the data is received into the still-reserved blocks and dropped, so the
pair stays in step), the sender's withdrawal (its request was aborted before the
sending step), or the end of the lease."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import xxhash
import zmq

from pdserve.v1 import kv_pb2, node_pb2

from .base import KVManager, KVReceiver, KVSender, Role, WriteFn
from .layout import KVLayout, kv_head_range, unique_ranks
from .nccl_store import serve_store
from .protocol import PROTOCOL_VERSION, check_layout
from .zmq_inbox import KVInbox
from .zmq_outbox import KVOutbox
from .zmq_sender import Outgoing

log = logging.getLogger(__name__)

EngineCall = Callable[[Callable], Future]   # runs fn(engine) on the engine thread


def transfer_key(transfer_id: str) -> int:
    """The int64 a transfer is known by on the ranks."""
    return xxhash.xxh3_64_intdigest(transfer_id.encode()) & ((1 << 62) - 1)


def pair_slices(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[tuple[int, int, int, int]]:
    """(prefill rank, decode rank, first global head, heads) for every pair that moves
    heads: each decode rank gets each of its heads from exactly one prefill rank."""
    out = []
    for s in range(decode_tp):
        c, d = kv_head_range(s, decode_tp, num_kv_heads)
        for r in unique_ranks(prefill_tp, num_kv_heads):
            a, b = kv_head_range(r, prefill_tp, num_kv_heads)
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((r, s, lo, hi - lo))
    return sorted(out)


@dataclass
class PairSet:
    """The pairs between one prefill node and one decode node."""
    name: str
    num_kv_heads: int
    prefill_tp: int
    decode_tp: int
    peer_id: str = ""            # the other node's id
    peer_epoch: int = 0
    endpoint: str = ""           # decode node's control endpoint (prefill side)
    ready: bool = False
    broken: bool = False
    slices: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slices = pair_slices(self.num_kv_heads, self.prefill_tp, self.decode_tp)

    def pair(self, r: int, s: int) -> str:
        return f"{self.name}/{r}-{s}"

    @property
    def pairs(self) -> list[str]:
        return [self.pair(r, s) for r, s, _, _ in self.slices]

    def dests(self) -> dict[str, list]:
        """Per prefill rank: (pair, first local head, heads) to send."""
        out: dict[str, list] = {}
        for r, s, lo, n in self.slices:
            out.setdefault(str(r), []).append([self.pair(r, s), lo - kv_head_range(r, self.prefill_tp,
                                                                                     self.num_kv_heads)[0], n])
        return out

    def srcs(self) -> dict[str, list]:
        """Per decode rank: (pair, first local head, heads) to receive."""
        out: dict[str, list] = {}
        for r, s, lo, n in self.slices:
            out.setdefault(str(s), []).append([self.pair(r, s), lo - kv_head_range(s, self.decode_tp,
                                                                                     self.num_kv_heads)[0], n])
        return out

    def open_spec(self, role: Role, host: str, port: int) -> list[dict]:
        """The KV_OPEN entries of one side, in (prefill rank, decode rank) order."""
        prefill = role == Role.PREFILL
        return [{"name": self.pair(r, s), "rank": r if prefill else s, "index": 0 if prefill else 1,
                 "host": host, "port": port} for r, s, _, _ in self.slices]


class NcclKVSender(KVSender):
    """Prefill side, one per request: the engine sends the data; this sends the two
    control messages and ends DONE once the ranks' sends completed and the finish was queued."""

    def __init__(self, manager: NcclKVManager, pairs: PairSet, transfer_id: str, epoch: int, num_blocks: int):
        super().__init__(transfer_id, epoch, num_blocks)
        self.manager, self.pairs, self.endpoint = manager, pairs, pairs.endpoint
        self.key = transfer_key(transfer_id)
        self.order = {"key": self.key, "dests": pairs.dests()}   # LLMEngine.add_request(kv_send=...)
        self._data_ok = self._finish_queued = self._finished = self._withdrawing = False
        self.answered = False

    def send_layers(self, layer_start, layers) -> None:
        raise RuntimeError("the NCCL transport sends from the engine step (add_request(kv_send=sender.order))")

    def announce(self) -> None:
        """Engine thread, in send order: tell the decode node to post its receives."""
        self.status.start()
        self.manager.submit(self, Outgoing(0, self.manager.layout.num_layers, []))

    def finish(self, first_token: int) -> None:
        if self._finish_queued:
            raise RuntimeError(f"transfer {self.transfer_id}: finish called twice")
        self._finish_queued = True
        if not self.status.ended:  # DONE only once the I/O thread took the message (build_message)
            self.manager.submit(self, Outgoing(self.manager.layout.num_layers, 0, [], last=True,
                                               first_token=first_token))

    def withdraw(self) -> None:
        """The request ended before its sends were issued: tell the receiver not to wait."""
        if not self.status.ended and not self._withdrawing:
            self._withdrawing = True
            self.manager.submit(self, Outgoing(0, 0, [], last=True, first_token=-1))

    def on_data(self, ok: bool, error: str) -> None:
        if not ok:
            self.fail(f"NCCL send failed: {error}")
        else:
            self._data_ok = True
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._data_ok and self._finished:
            self.status.finish()

    def build_message(self, out: Outgoing) -> list[bytes]:
        """(I/O thread) The control message; the finish, once built, may end the transfer."""
        withdrawn = out.last and self._withdrawing
        if withdrawn:
            self.status.fail("withdrawn")
        elif out.last:
            self._finished = True
            self._maybe_done()
        layout = self.manager.layout
        shards = [kv_pb2.KVShard(tp_rank=r, head_start=kv_head_range(r, self.pairs.prefill_tp, layout.num_kv_heads)[0],
                                 num_heads=n) for r, n in self._shard_heads()] if out.num_layers else []
        return [kv_pb2.KVHeader(
            protocol_version=PROTOCOL_VERSION, compat_hash=layout.compat_hash, transfer_id=self.transfer_id,
            epoch=self.epoch, layer_start=out.layer_start, num_layers=out.num_layers, total_layers=layout.num_layers,
            num_blocks=self.num_blocks, block_size=layout.block_size, head_dim=layout.head_dim,
            dtype=layout.dtype_name, shards=shards, last=out.last, first_token=out.first_token,
            pair_set=self.pairs.name, withdrawn=withdrawn).SerializeToString()]

    def _shard_heads(self) -> list[tuple[int, int]]:
        h, tp = self.manager.layout.num_kv_heads, self.pairs.prefill_tp
        return [(r, kv_head_range(r, tp, h)[1] - kv_head_range(r, tp, h)[0]) for r in unique_ranks(tp, h)]

    def on_ack(self, ack: kv_pb2.KVAck) -> None:
        self.answered = True
        if not ack.ok:
            self.fail(f"refused by the receiver: {ack.error}")

    def fail(self, error: str) -> None:
        self.status.fail(error)

    def release(self) -> None:
        pass  # nothing held here: the ranks hold the buffers until their sends end


class NcclKVReceiver(KVReceiver):
    """Decode side, one per request (see the module docstring for when it may end)."""

    def __init__(self, manager: NcclKVManager, transfer_id: str, epoch: int, block_ids: list[int],
                 lease_expiry: float, tp: int):
        super().__init__(transfer_id, epoch, block_ids, lease_expiry, tp)
        self.manager = manager
        self.key = transfer_key(transfer_id)
        self.posted = False       # receives posted on the ranks (or about to be)
        self._data: bool | None = None   # None: in flight; True: verified; False: failed
        self._failure = ""
        self._got_first = False
        self._lock = threading.Lock()

    def accept(self, header: kv_pb2.KVHeader, frames) -> str:
        with self._lock:
            if self.status.ended:
                return self.error or "transfer already complete"
            if header.withdrawn:
                if not self.posted:
                    self._end_failed(self._failure or "withdrawn by the prefill node")
                return ""
            if not header.last:
                error = ("announced twice" if self.posted else
                         "unexpected data frames" if frames else
                         check_layout(header, self.manager.layout, len(self.block_ids), 0)
                         or ("" if header.num_layers == self.manager.layout.num_layers
                             else f"announce of {header.num_layers} layers")
                         or ("" if header.pair_set in self.manager.pair_sets else
                             f"unknown pair set {header.pair_set!r}"))
                if error:
                    self._end_failed(error)
                    return error
                self.posted = True
                self.status.start()
                self.manager.post_recv(self, self.manager.pair_sets[header.pair_set])
                return ""
            if not self.posted:
                error = "finish before announce"
                self._end_failed(error)
                return error
            self.first_token, self._got_first = header.first_token, True
            self._maybe_end()
            return ""

    def on_data(self, ok: bool, error: str) -> None:
        with self._lock:
            self._data = ok
            if not ok:
                self._failure = self._failure or f"NCCL receive failed: {error}"
            self._maybe_end()

    def cancel(self) -> bool:
        """The request is gone. Before the announce, the sender may still have issued its
        sends (the announce is on its way): stay expected until the announce (its data is
        then received and dropped, so the pair stays in step), the sender's withdrawal or
        the lease's end; the blocks stay reserved until then."""
        with self._lock:
            if self.status.ended:
                return False
            if not self.posted and time.time() < self.lease_expiry:
                self._failure = self._failure or "cancelled"
                return True
        return self.fail("cancelled")

    def fail(self, error: str) -> bool:
        """FAILED now, or once the posted receives ended (they may still write the blocks)."""
        with self._lock:
            if self.status.ended:
                return False
            if self.posted and self._data is None:
                self._failure = self._failure or error
                return True
            return self._end_failed(error)

    def _maybe_end(self) -> None:
        if self._data is None:
            return
        if self._failure:
            self._end_failed(self._failure)
        elif self._got_first:
            self.status.finish()
            self.manager.retire(self)

    def _end_failed(self, error: str) -> bool:
        ended = self.status.fail(error)
        self.manager.retire(self)
        return ended


class NcclKVManager(KVManager):
    def __init__(self, role: Role, layout: KVLayout, engine_call: EngineCall, bind_host: str = "127.0.0.1",
                 tp: int = 1, poll_interval_s: float = 0.05):
        self.role, self.layout, self.tp, self.bind_host = Role(role), layout, tp, bind_host
        self.engine_call = engine_call
        self.poll_ms = max(1, int(poll_interval_s * 1000))
        self.pair_sets: dict[str, PairSet] = {}      # by name
        self._by_peer: dict[str, PairSet] = {}       # prefill side: by decode node id
        self._connecting: dict[str, asyncio.Task] = {}
        self._retry: dict[str, tuple[float, float]] = {}   # peer -> (not before, backoff s) after a failure
        self._missing: dict[str, float] = {}  # decode side: prefill node -> when first seen absent
        self._generation = 0
        self._pending: dict[int, NcclKVSender | NcclKVReceiver] = {}   # engine thread only
        self._senders: dict[int, NcclKVSender] = {}
        self._lock = threading.Lock()
        self._ctx: zmq.Context | None = None
        self._inbox: KVInbox | None = None
        self._outbox: KVOutbox | None = None
        self._store = None
        self._endpoint = ""
        self.store_port = 0
        self.node_id = ""

    # lifecycle

    def start(self) -> None:
        self._ctx = zmq.Context()
        if self.role == Role.DECODE:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(f"tcp://{self.bind_host}:0")
            self._endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._inbox = KVInbox(self.layout, router, self.poll_ms)
            self._inbox.start()
            self._store, self.store_port = serve_store(self.bind_host, 0)
        else:
            self._outbox = KVOutbox(self._ctx, self.poll_ms)
            self._outbox.start()

    def close(self) -> None:
        if self._ctx is None:
            return
        for task in self._connecting.values():
            task.cancel()
        for part in (self._inbox, self._outbox):
            if part is not None:
                part.close()
        self._ctx.term()
        self._ctx, self._inbox, self._outbox, self._store = None, None, None, None

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def pending(self) -> int:
        return len(self._pending)

    # engine thread

    def poll(self, engine) -> bool:
        """EngineLoop's poll hook: collect ended transfers; True while any is in flight."""
        if not self._pending:
            return False
        for key, (ok, error) in engine.kv_poll(list(self._pending)).items():
            owner = self._pending.pop(key, None)
            if owner is not None:
                owner.on_data(ok, error)
                if not ok:
                    self._mark_broken(owner, error)
        return bool(self._pending)

    def on_kv_send(self, seq, order: dict) -> None:
        """LLMEngine.on_kv_send: the step about to run issues this transfer's sends."""
        tx = self._senders.get(order["key"])
        if tx is None or tx.status.ended:
            log.warning("KV sends issued for an unknown or ended transfer")
            return
        self._pending[tx.key] = tx
        tx.announce()

    def _mark_broken(self, owner, error: str) -> None:
        if "timed out" in error or "abort" in error:
            pairs = owner.pairs if isinstance(owner, NcclKVSender) else None
            for ps in ([pairs] if pairs else list(self.pair_sets.values())):
                if ps is not None:
                    ps.broken = True

    # decode role

    def accept_pairs(self, req) -> tuple[str, int]:
        """OpenKVPairs: check, start joining the pairs on the engine thread, answer the store address."""
        if req.protocol_version != PROTOCOL_VERSION:
            raise ValueError(f"KV protocol version {req.protocol_version}, this node speaks {PROTOCOL_VERSION}")
        if req.compat_hash != self.layout.compat_hash:
            raise ValueError(f"compat_hash mismatch: {req.compat_hash!r}, this node has {self.layout.compat_hash!r}")
        for r in range(req.prefill_tp):
            self.layout.heads(r, req.prefill_tp)  # raises if that TP and the KV heads do not fit
        ps = PairSet(req.pair_set, self.layout.num_kv_heads, req.prefill_tp, self.tp, peer_id=req.prefill_node_id)
        old = [s for s in self.pair_sets.values() if s.peer_id == req.prefill_node_id]
        for s in old:
            del self.pair_sets[s.name]
        self.pair_sets[ps.name] = ps
        host = self.advertised_host

        def join(engine):
            if old:
                engine.kv_close_pairs([p for s in old for p in s.pairs])
            engine.kv_open_pairs(ps.open_spec(Role.DECODE, host, self.store_port))
            ps.ready = True

        fut = self.engine_call(join)
        fut.add_done_callback(lambda f: f.exception() and self._join_failed(ps, f.exception()))
        return host, self.store_port

    def on_prefill_peers(self, live: set[str], grace_s: float = 10.0) -> None:
        """(event loop) Close the pair sets of prefill nodes the coordinator has not
        listed for grace_s (a node that only missed a few heartbeats keeps its set)."""
        now = time.monotonic()
        for ps in list(self.pair_sets.values()):
            if ps.peer_id in live:
                self._missing.pop(ps.peer_id, None)
            elif now - self._missing.setdefault(ps.peer_id, now) >= grace_s:
                self._missing.pop(ps.peer_id, None)
                log.info("KV pair set %s closed: prefill node %s left", ps.name, ps.peer_id)
                self._drop(ps)

    def _join_failed(self, ps: PairSet, exc: BaseException) -> None:
        log.warning("KV pair set %s did not open: %s", ps.name, exc)
        if self.pair_sets.get(ps.name) is ps:
            del self.pair_sets[ps.name]

    @property
    def advertised_host(self) -> str:
        if self.bind_host in ("0.0.0.0", "::", ""):
            return socket.gethostbyname(socket.gethostname())
        return self.bind_host

    def expect(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
               write: WriteFn | None = None) -> NcclKVReceiver:
        if self._inbox is None:
            raise RuntimeError("a prefill KV manager has no decode-side calls")
        if not block_ids:
            raise ValueError(f"transfer {transfer_id}: no blocks reserved")
        rx = NcclKVReceiver(self, transfer_id, epoch, block_ids, lease_expiry, self.tp)
        self._inbox.expect(rx)
        return rx

    def cancel(self, transfer_id: str) -> bool:
        rx = self._inbox.expected(transfer_id) if self._inbox is not None else None
        return rx is not None and rx.cancel()

    def post_recv(self, rx: NcclKVReceiver, ps: PairSet) -> None:
        """(inbox thread) Post the receives on the engine thread, in announce order."""
        srcs, layers = ps.srcs(), self.layout.num_layers

        def post(engine):
            engine.kv_recv(rx.key, rx.block_ids, srcs, layers)
            self._pending[rx.key] = rx

        fut = self.engine_call(post)
        fut.add_done_callback(lambda f: f.exception() and rx.on_data(False, f"posting failed: {f.exception()}"))

    def retire(self, rx: NcclKVReceiver) -> None:
        if self._inbox is not None:
            self._inbox.retire(rx)

    # prefill role

    def set_node(self, node_id: str) -> None:
        self.node_id = node_id

    def on_peers(self, peers, open_rpc) -> None:
        """(event loop) The coordinator's live decode nodes: open a pair set towards each
        new or restarted one, or one whose set broke; close the sets of departed ones.
        open_rpc(peer, request) is an async OpenKVPairs call on the peer."""
        live = {}
        for p in peers:
            if p.compat_hash != self.layout.compat_hash:
                continue
            live[p.node_id] = p
            ps = self._by_peer.get(p.node_id)
            stale = ps is None or ps.broken or ps.peer_epoch != p.epoch
            if stale and p.node_id not in self._connecting and time.monotonic() >= self._retry.get(p.node_id, (0, 0))[0]:
                task = asyncio.ensure_future(self._connect(p, open_rpc))
                self._connecting[p.node_id] = task
                task.add_done_callback(lambda _, n=p.node_id: self._connecting.pop(n, None))
        for node_id in [n for n in self._by_peer if n not in live]:
            self._drop(self._by_peer.pop(node_id))

    async def _connect(self, peer, open_rpc) -> None:
        self._generation += 1
        name = f"{self.node_id}.{self._generation}"
        req = node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION, compat_hash=self.layout.compat_hash,
                                      prefill_node_id=self.node_id, prefill_tp=self.tp, pair_set=name)
        try:
            resp = await open_rpc(peer, req)
            ps = PairSet(name, self.layout.num_kv_heads, self.tp, resp.decode_tp, peer_id=peer.node_id,
                         peer_epoch=peer.epoch, endpoint=peer.kv_endpoint)
            old = self._by_peer.get(peer.node_id)
            spec = ps.open_spec(Role.PREFILL, resp.store_host, resp.store_port)

            def join(engine):
                if old is not None:
                    engine.kv_close_pairs(old.pairs)
                engine.kv_open_pairs(spec)

            await asyncio.wrap_future(self.engine_call(join))
        except Exception as e:  # retried at a later peer update, backing off
            backoff = min(30.0, 2 * self._retry.get(peer.node_id, (0, 0.5))[1])
            self._retry[peer.node_id] = (time.monotonic() + backoff, backoff)
            log.warning("KV pairs towards %s did not open (next try in %.0f s): %s", peer.node_id, backoff, e)
            return
        self._retry.pop(peer.node_id, None)
        ps.ready = True
        if old is not None:
            self.pair_sets.pop(old.name, None)
        self.pair_sets[name] = ps
        self._by_peer[peer.node_id] = ps
        log.info("KV pairs %s open towards %s (TP %d -> %d)", name, peer.node_id, self.tp, ps.decode_tp)

    def _drop(self, ps: PairSet) -> None:
        self.pair_sets.pop(ps.name, None)
        self.engine_call(lambda engine: engine.kv_close_pairs(ps.pairs))

    async def ready_pairs(self, decode_node_id: str, wait_s: float) -> PairSet | None:
        """The open set towards a decode node, waiting up to wait_s for one being opened."""
        deadline = time.monotonic() + wait_s
        while True:
            ps = self._by_peer.get(decode_node_id)
            if ps is not None and ps.ready and not ps.broken:
                return ps
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.01)

    def sender(self, endpoint: str, transfer_id: str, epoch: int, num_blocks: int, pairs: PairSet | None = None
               ) -> NcclKVSender:
        if self._outbox is None or pairs is None:
            raise RuntimeError("NCCL senders need a prefill manager and an open pair set")
        tx = NcclKVSender(self, pairs, transfer_id, epoch, num_blocks)
        self._senders = {k: s for k, s in self._senders.items() if not s.status.ended}
        self._senders[tx.key] = tx
        self._outbox.add(tx)
        return tx

    def submit(self, tx: NcclKVSender, out: Outgoing) -> None:
        self._outbox.submit(tx, out)

