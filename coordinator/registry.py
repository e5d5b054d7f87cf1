"""The nodes the coordinator knows, their load, and which are healthy.

A node is live while it heartbeats and nothing marked it down. A node marked down
(an RPC could not reach it, its token stream broke, it missed its beats) is fenced
off: its next heartbeat is answered `known=False`, so it registers again under a
new epoch and drops whatever it still held of the old one. Nodes that stay silent
are forgotten after `expiry_s`."""
from __future__ import annotations

import asyncio
import itertools
import time
import logging
import uuid
from dataclasses import dataclass, field

import grpc

from pdserve.wire.rpc import RpcError, channel
from pdserve.coordinator.cache_view import CacheView
from pdserve.wire.security import NONE, Credentials
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.coordinator")


@dataclass(eq=False)  # compared and hashed by identity: one entry per registration
class NodeEntry:
    id: str
    role: int
    address: str
    kv_endpoint: str
    tp: int
    model: node_pb2.ModelInfo
    epoch: int
    kv_blocks_total: int
    kv_blocks_free: int = 0
    running: int = 0
    queued: int = 0
    queued_tokens: int = 0
    kv_transport: str = ""
    kv_curve_key: str = ""           # its ZeroMQ CURVE public key (secured clusters)
    last_seen: float = field(default_factory=time.monotonic)
    listed_at: float = field(default_factory=time.monotonic)  # when this registry first listed it
    down: bool = False               # fenced off: an RPC failed, its stream broke or it missed its beats
    inflight: int = 0                # requests routed here by this coordinator and not finished
    inflight_tokens: int = 0         # prefill: prompt tokens sent here to compute and not yet answered
    streaming: bool = False          # decode: its token stream to this coordinator is open
    channel: grpc.aio.Channel | None = None
    stub: object = None              # DecodeNodeStub (decode, both) or PrefillNodeStub (prefill)
    prefill_stub: object = None      # PrefillNodeStub of a prefill or colocated node
    counters: api_pb2.NodeCounters = field(default_factory=api_pb2.NodeCounters)
    cache: CacheView = field(default_factory=CacheView)  # its prefix cache, for cache-aware routing

    def status(self, healthy: bool) -> api_pb2.NodeStatus:
        return api_pb2.NodeStatus(id=self.id, role=self.role, address=self.address, healthy=healthy, tp=self.tp,
                                  kv_blocks_free=self.kv_blocks_free, kv_blocks_total=self.kv_blocks_total,
                                  running=self.running, queued=self.queued, kv_transport=self.kv_transport,
                                  counters=self.counters, cached_blocks=len(self.cache.blocks))


class Registry:
    def __init__(self, heartbeat_interval_s: float, missed_beats: int = 3, expiry_s: float = 30.0,
                 creds: Credentials = NONE):
        """creds: what the coordinator shows the nodes it calls (TLS, the cluster secret)."""
        self.creds = creds
        self.interval = heartbeat_interval_s
        self.timeout = heartbeat_interval_s * missed_beats
        self.expiry_s = max(expiry_s, self.timeout)
        self.nodes: dict[str, NodeEntry] = {}
        self._epochs = itertools.count(int(time.time() * 1000))

    def live(self, node: NodeEntry) -> bool:
        """Not fenced off, and heard from within the heartbeat timeout."""
        return not node.down and time.monotonic() - node.last_seen < self.timeout

    def register(self, req: node_pb2.RegisterRequest) -> NodeEntry:
        """A new entry; an entry at the same address is replaced only if it is no longer
        live (a node restarting on its address), never a live one (ALREADY_EXISTS)."""
        self.refuse_taken(req.address)
        for old in [n for n in self.nodes.values() if n.address == req.address]:
            self.remove(old.id)
        return self.add(NodeEntry(id=uuid.uuid4().hex[:12], role=req.role, address=req.address,
                                  kv_endpoint=req.kv_endpoint, tp=req.tp, model=req.model, epoch=next(self._epochs),
                                  kv_blocks_total=req.kv_blocks_total, kv_blocks_free=req.kv_blocks_total,
                                  kv_transport=req.kv_transport, kv_curve_key=req.kv_curve_key))

    def add(self, node: NodeEntry) -> NodeEntry:
        """Open a channel to a new entry and list it (a worker's mirror adds the supervisor's entries)."""
        node.channel = channel(node.address, self.creds)
        if node.role != api_pb2.ROLE_PREFILL:
            node.stub = node_pb2_grpc.DecodeNodeStub(node.channel)
        node.prefill_stub = node_pb2_grpc.PrefillNodeStub(node.channel)  # decode nodes: local prefills
        node.stub = node.stub or node.prefill_stub
        self.nodes[node.id] = node
        return node

    def refuse_taken(self, address: str) -> None:
        """ALREADY_EXISTS if a live node is registered at address."""
        if any(n.address == address and self.live(n) for n in self.nodes.values()):
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS,
                           f"a live node is registered at {address}; retry once it stops heartbeating")

    def remove(self, node_id: str) -> NodeEntry | None:
        node = self.nodes.pop(node_id, None)
        if node is not None and node.channel is not None:
            asyncio.ensure_future(node.channel.close())
        return node

    def heartbeat(self, req: node_pb2.HeartbeatRequest) -> bool:
        """False: unknown, stale epoch or fenced off; the node must register again."""
        node = self.nodes.get(req.node_id)
        if node is None or node.epoch != req.epoch or node.down:
            return False
        node.kv_blocks_free, node.running, node.queued = req.kv_blocks_free, req.running, req.queued
        node.queued_tokens, node.last_seen = req.queued_tokens, time.monotonic()
        node.counters = req.counters
        node.cache.apply(req.cache)
        return True

    def credit(self, lag_s: float) -> None:
        """The coordinator's own loop stalled for lag_s: the beats it could not read then
        do not count as missed."""
        for node in self.nodes.values():
            node.last_seen += lag_s

    def silent(self) -> list[NodeEntry]:
        """Nodes not yet fenced off that missed their heartbeats."""
        now = time.monotonic()
        return [n for n in self.nodes.values() if not n.down and now - n.last_seen >= self.timeout]

    def expire(self) -> list[NodeEntry]:
        """Forget nodes silent for longer than expiry_s (status stops listing them)."""
        now = time.monotonic()
        gone = [n for n in self.nodes.values() if now - n.last_seen >= self.expiry_s]
        for n in gone:
            self.remove(n.id)
        return gone

    def healthy(self, node: NodeEntry) -> bool:
        """Live, and for a decode node, its token stream is open (for a prefill node, see known_to_peers)."""
        return self.live(node) and (node.streaming or (node.role == api_pb2.ROLE_PREFILL and self.known_to_peers(node)))

    def known_to_peers(self, node: NodeEntry) -> bool:
        """A prefill node with a CURVE key is routable once every live decode node has heard
        from this registry since it listed the node: each got a peer list with its key, so
        its KV connections pass the decode node's gate."""
        if not node.kv_curve_key:
            return True
        return all(d.last_seen >= node.listed_at for d in self.nodes.values()
                   if d.role == api_pb2.ROLE_DECODE and self.live(d))

    def peers(self, node: NodeEntry) -> dict[str, list[node_pb2.Peer]]:
        """The live nodes on the other side of a node's KV plane: decode nodes for a
        prefill node (it sets up its transport towards each before any request), prefill
        nodes for a decode node (it drops what it set up for departed ones)."""
        other = {api_pb2.ROLE_PREFILL: api_pb2.ROLE_DECODE, api_pb2.ROLE_DECODE: api_pb2.ROLE_PREFILL}.get(node.role)
        if other is None:
            return {}
        live = [node_pb2.Peer(node_id=n.id, epoch=n.epoch, address=n.address, kv_endpoint=n.kv_endpoint, tp=n.tp,
                              compat_hash=n.model.compat_hash, kv_curve_key=n.kv_curve_key)
                for n in self.nodes.values() if n.role == other and self.live(n)]
        return {"decode_peers" if other == api_pb2.ROLE_DECODE else "prefill_peers": live}

    def candidates(self, role: int, exclude: set[str] = frozenset()) -> list[NodeEntry]:
        """Healthy nodes that can take a role (a colocated node takes both), best first:
        decode by load then free blocks, prefill by load then queued prompt tokens."""
        nodes = [n for n in self.nodes.values()
                 if n.role in (role, api_pb2.ROLE_BOTH) and self.healthy(n) and n.id not in exclude]
        if role == api_pb2.ROLE_DECODE:
            return sorted(nodes, key=lambda n: (n.inflight + n.running, -n.kv_blocks_free))
        return sorted(nodes, key=lambda n: (n.inflight, n.queued_tokens))

    async def watch(self, who: str, on_silent, on_expired, on_tick=lambda: None) -> None:
        """Every heartbeat interval: on_silent for nodes that missed their heartbeats,
        on_expired for long-silent ones (already forgotten), then on_tick. A stall of the
        caller's own event loop is credited to the nodes, not counted against them."""
        loop = asyncio.get_running_loop()
        interval = self.interval
        last = loop.time()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            lag, last = now - last - interval, now
            if lag > interval:
                log.warning("the %s's event loop stalled for %.2f s", who, lag)
                self.credit(lag)
            for node in self.silent():
                on_silent(node)
            for node in self.expire():
                log.info("forgot node %s (silent for %.0f s)", node.id, self.expiry_s)
                on_expired(node)
            on_tick()
