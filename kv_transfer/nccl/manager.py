"""NcclKVManager: the KV data plane over NCCL (gloo where there is no GPU), one per
node and role.

Data: one 2-rank communicator per (prefill rank, decode rank) pair that shares KV
heads; RankKV (rank.py) moves the heads in each rank process, driven through the
engine's KV connector (connector.py: LLMEngine.kv_apply, kv_save, kv_finished). A prefill rank gathers a layer group's blocks
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
import time

import zmq

from pdserve.engine.kv_connector import KVConnectorMetadata, KVLoad, KVSave
from pdserve.kv_transfer.base.conn import KVManager, KVUnavailable, NodeLink, Role, WriteFn
from pdserve.kv_transfer.base.curve import KeyGate
from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
from pdserve.kv_transfer.base.inbox import KVInbox
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.kv_transfer.base.outbox import KVOutbox
from pdserve.v1 import node_pb2

from .pairs import PairSet
from .receiver import NcclKVReceiver
from .sender import NcclKVSender
from .store import serve_store

log = logging.getLogger(__name__)


class NcclKVManager(KVManager):
    name = "nccl"
    inbox_class = KVInbox

    def __init__(self, role: Role, layout: KVLayout, link: NodeLink, bind_host: str = "127.0.0.1",
                 tp: int = 1, poll_interval_s: float = 0.05):
        """link: the node's engine thread and pairing RPC."""
        self.role, self.layout, self.tp, self.bind_host = Role(role), layout, tp, bind_host
        self.engine_call, self.open_rpc = link.engine_call, link.open_pairs
        self.curve, self.gate = link.curve, None   # CURVE on the ZeroMQ control sockets (secured clusters)
        self.poll_ms = max(1, int(poll_interval_s * 1000))
        self.pair_sets: dict[str, PairSet] = {}      # by name
        self._by_peer: dict[str, PairSet] = {}       # prefill side: by decode node id
        self._connecting: dict[str, asyncio.Task] = {}
        self._retry: dict[str, tuple[float, float]] = {}   # peer -> (not before, backoff s) after a failure
        self._missing: dict[str, float] = {}  # decode side: prefill node -> when first seen absent
        self._generation = 0
        self._pending: dict[int, NcclKVSender | NcclKVReceiver] = {}   # engine thread only
        self._senders: dict[int, NcclKVSender] = {}
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
            if self.curve is not None:
                self.gate = KeyGate(self._ctx)
                self.gate.start()
                self.curve.serve(router)
            router.bind(f"tcp://{self.bind_host}:0")
            self._endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._inbox = self.inbox_class(self.layout, router, self.poll_ms)
            self._inbox.start()
            self._store, self.store_port = serve_store(self.bind_host, 0)
        else:
            self._outbox = KVOutbox(self._ctx, self.poll_ms, curve=self.curve)
            self._outbox.start()

    def close(self) -> None:
        if self._ctx is None:
            return
        for task in self._connecting.values():
            task.cancel()
        for part in (self._inbox, self._outbox):
            if part is not None:
                part.close()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
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
        for key, (ok, error) in engine.kv_finished(list(self._pending)).items():
            owner = self._pending.pop(key, None)
            if owner is not None:
                owner.on_data(ok, error)
                if not ok and isinstance(owner, NcclKVSender):
                    owner.pairs.broken = True  # reopened at the next peer update: the pair may be out of step
        return bool(self._pending)

    def on_save_start(self, save: KVSave) -> None:
        """LLMEngine.on_kv_save: the step about to run issues this transfer's sends."""
        tx = self._senders.get(save.key)
        if tx is None or tx.status.ended:
            log.warning("KV sends issued for an unknown or ended transfer")
            return
        self._pending[tx.key] = tx
        tx.announce()

    # decode role

    def check_pairs_request(self, req) -> None:
        """OpenKVPairs' checks, in order: protocol version, transport, compat hash, TP size (ValueError: why)."""
        if req.protocol_version != PROTOCOL_VERSION:
            raise ValueError(f"KV protocol version {req.protocol_version}, this node speaks {PROTOCOL_VERSION}")
        if req.kv_transport and req.kv_transport != self.name:
            raise ValueError(f"the prefill node's KV transport is {req.kv_transport}, this decode node's {self.name}: "
                             f"give both the same --kv-transport")
        if req.compat_hash != self.layout.compat_hash:
            raise ValueError(f"compat_hash mismatch: {req.compat_hash!r}, this node has {self.layout.compat_hash!r}")
        for r in range(req.prefill_tp):
            self.layout.heads(r, req.prefill_tp)  # raises if that TP and the KV heads do not fit

    def accept_pairs(self, req) -> tuple[str, int]:
        """OpenKVPairs: check, start joining the pairs on the engine thread, answer the store address."""
        self.check_pairs_request(req)
        ps = PairSet(req.pair_set, self.layout.num_kv_heads, req.prefill_tp, self.tp, peer_id=req.prefill_node_id)
        old = [s for s in self.pair_sets.values() if s.peer_id == req.prefill_node_id]
        for s in old:
            del self.pair_sets[s.name]
        self.pair_sets[ps.name] = ps
        host = self.advertised_host

        def join(engine):
            engine.kv_apply(KVConnectorMetadata(connect=ps.channels(Role.DECODE, host, self.store_port),
                                                disconnect=tuple(p for s in old for p in s.pairs)))
            ps.ready = True

        fut = self.engine_call(join)
        fut.add_done_callback(lambda f: f.exception() and self._join_failed(ps, f.exception()))
        return host, self.store_port

    def on_peers(self, node_id: str, peers: list[node_pb2.Peer]) -> None:
        """(event loop) Prefill role: open a pair set towards each decode peer; decode role:
        close the sets of prefill nodes that left."""
        self.node_id = node_id
        if self.role == Role.PREFILL:
            self.open_towards(peers)
        else:
            if self.gate is not None:  # the control socket admits exactly the listed prefill peers' keys
                self.gate.allow({p.kv_curve_key.encode() for p in peers if p.kv_curve_key})
            self.on_prefill_peers({p.node_id for p in peers})

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
        rx = NcclKVReceiver(self.layout, transfer_id, epoch, block_ids, lease_expiry, self.tp, self.pair_sets.get,
                            self.post_recv, self.retire)
        self._inbox.expect(rx)
        return rx

    def cancel(self, transfer_id: str) -> bool:
        rx = self._inbox.expected(transfer_id) if self._inbox is not None else None
        return rx is not None and rx.cancel()

    def post_recv(self, rx: NcclKVReceiver, ps: PairSet) -> None:
        """(inbox thread) Post the receives on the engine thread, in announce order."""
        srcs, layers = ps.srcs(), self.layout.num_layers

        def post(engine):
            engine.kv_apply(KVConnectorMetadata(loads=(KVLoad(rx.key, tuple(rx.block_ids), srcs, layers),)))
            self._pending[rx.key] = rx

        fut = self.engine_call(post)
        fut.add_done_callback(lambda f: f.exception() and rx.on_data(False, f"posting failed: {f.exception()}"))

    def retire(self, rx: NcclKVReceiver) -> None:
        if self._inbox is not None:
            self._inbox.retire(rx)

    # prefill role

    def open_towards(self, peers: list[node_pb2.Peer]) -> None:
        """(event loop) The coordinator's live decode nodes: open a pair set towards each
        new or restarted one, or one whose set broke; close the sets of departed ones
        (the pairing RPC is the link's open_pairs)."""
        live = {}
        for p in peers:
            if p.compat_hash != self.layout.compat_hash:
                continue
            live[p.node_id] = p
            ps = self._by_peer.get(p.node_id)
            stale = ps is None or ps.broken or ps.peer_epoch != p.epoch
            if stale and p.node_id not in self._connecting and time.monotonic() >= self._retry.get(p.node_id, (0, 0))[0]:
                task = asyncio.ensure_future(self._connect(p))
                self._connecting[p.node_id] = task
                task.add_done_callback(lambda _, n=p.node_id: self._connecting.pop(n, None))
        for node_id in [n for n in self._by_peer if n not in live]:
            self._drop(self._by_peer.pop(node_id))

    async def _connect(self, peer) -> None:
        self._generation += 1
        name = f"{self.node_id}.{self._generation}"
        req = self.pairs_request(name)
        try:
            resp = await self.open_rpc(peer, req)
            ps = PairSet(name, self.layout.num_kv_heads, self.tp, resp.decode_tp, peer_id=peer.node_id,
                         peer_epoch=peer.epoch, endpoint=peer.kv_endpoint)
            old = self._by_peer.get(peer.node_id)
            meta = KVConnectorMetadata(connect=ps.channels(Role.PREFILL, resp.store_host, resp.store_port),
                                       disconnect=tuple(old.pairs) if old is not None else ())

            def join(engine):
                engine.kv_apply(meta)

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

    def pairs_request(self, name: str) -> node_pb2.KVPairsRequest:
        return node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION, compat_hash=self.layout.compat_hash,
                                       prefill_node_id=self.node_id, prefill_tp=self.tp, pair_set=name,
                                       kv_transport=self.name)

    def _drop(self, ps: PairSet) -> None:
        self.pair_sets.pop(ps.name, None)
        self.engine_call(lambda engine: engine.kv_apply(KVConnectorMetadata(disconnect=tuple(ps.pairs))))

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

    async def sender_for(self, ticket: node_pb2.Ticket, num_blocks: int) -> NcclKVSender:
        """A sender over the pair set towards the ticket's decode node, waiting up to 10 s for one being opened."""
        pairs = await self.ready_pairs(ticket.decode_node_id, wait_s=10.0)
        if pairs is None:
            raise KVUnavailable(f"no NCCL pairs open towards decode node {ticket.decode_node_id}")
        self.trust(pairs.endpoint, ticket)
        return self.sender(ticket.transfer_id, ticket.epoch, num_blocks, pairs)

    def trust(self, endpoint: str, ticket: node_pb2.Ticket) -> None:
        """With CURVE: the control socket to endpoint checks the decode node's key from its ticket."""
        if self.curve is None:
            return
        if not ticket.kv_curve_key:
            raise KVUnavailable(f"decode node {ticket.decode_node_id} has no CURVE key: this node sends only "
                                f"over CURVE (give every member the same credentials)")
        self._outbox.set_server_key(endpoint, ticket.kv_curve_key.encode())

    def sender(self, transfer_id: str, epoch: int, num_blocks: int, pairs: PairSet) -> NcclKVSender:
        if self._outbox is None:
            raise RuntimeError("NCCL senders need a prefill manager")
        tx = NcclKVSender(self.layout, pairs, transfer_id, epoch, num_blocks, self._outbox.submit)
        self._senders = {k: s for k, s in self._senders.items() if not s.status.ended}
        self._senders[tx.key] = tx
        self._outbox.add(tx)
        return tx
