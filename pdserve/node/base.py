"""What prefill and decode nodes share: the engine on its loop thread, the gRPC
server with health, the KV manager and the link to the coordinator. A node is
started with start() and stopped with close(); constructing it starts nothing."""
from __future__ import annotations

import asyncio
import logging

import grpc

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine, StepBatch
from pdserve.kv_transfer.base.conn import NodeLink, Role
from pdserve.kv_transfer.base.curve import CurveKeys
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.kv_transfer.registry import AUTO, auto_choice, backend
from pdserve.node.agent import NodeAgent
from pdserve.node.metrics import NodeMetrics
from pdserve.node.report import NodeReport
from pdserve.common.config import NodeConfig
from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.wire.rpc import RpcError, ServerHandle, channel
from pdserve.wire.security import Credentials
from pdserve.common.model_files import DEFAULT_MODEL, checkpoint_hash, compat_hash
from pdserve.v1 import api_pb2, node_pb2

log = logging.getLogger("pdserve.node")


class NodeBase:
    role: int = api_pb2.ROLE_UNSPECIFIED
    kv_role: Role = Role.PREFILL
    service_name = ""
    engine_detokenizes = True  # False: only stop-string sequences; the node detokenizes the rest

    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.engine: LLMEngine | None = None
        self.stopped = asyncio.Event()   # set when the engine failed: the process must exit non-zero
        self.fatal = False
        self.tasks: set[asyncio.Task] = set()  # background work of calls (KV waits, releases, cleanups)
        self.metrics = NodeMetrics(self)
        self.peers: dict[str, node_pb2.Peer] = {}  # the coordinator's latest list of this node's KV peers
        self._peers_changed = asyncio.Event()

    async def start(self) -> str:
        self.aio = asyncio.get_running_loop()
        self.creds = Credentials.member(self.cfg.security)
        self.creds.check_listen(self.cfg.listen, f"this {self.kv_role.value} node")
        asked = self.cfg.kv_transport
        if asked == AUTO:
            role = "both" if self.role == api_pb2.ROLE_BOTH else self.kv_role.value
            self.cfg.kv_transport, why = auto_choice(self.cfg.engine.device, role, self.cfg.coordinator)
            if why:  # a slower transport than this GPU node could have had: said aloud, and shown in status
                log.warning("--kv-transport auto: %s, not cuda-ipc: %s", self.cfg.kv_transport, why)
            else:
                log.info("--kv-transport auto: %s", self.cfg.kv_transport)
        kv = backend(self.cfg.kv_transport)
        if self.cfg.kv is None:
            self.cfg.kv = kv.config_class()
        elif not isinstance(self.cfg.kv, kv.config_class):
            raise ValueError(f"the {kv.name} KV transport takes a {kv.config_class.__name__}, "
                             f"not a {type(self.cfg.kv).__name__}")
        kv_host = getattr(self.cfg.kv, "host", None)
        if kv_host:
            self.creds.check_listen(f"{kv_host}:0", f"this {self.kv_role.value} node's KV plane")
        # a secured member's ZeroMQ sockets use CURVE; public keys travel over the control plane
        self.curve = CurveKeys.generate() if (self.creds.tls or self.creds.secret) else None
        self.engine = await asyncio.to_thread(LLMEngine(self.cfg.engine, kv.connector(self.cfg.kv),
                                                          detokenize=self.engine_detokenizes).start)
        info = self.model = model_info(self.engine)
        self.report = NodeReport(self.engine)
        layout = KVLayout(info.num_layers, info.num_kv_heads, info.head_dim, info.block_size,
                          self.engine.executor.runner.dtype, info.compat_hash)
        self.kv = kv.manager(self.kv_role, layout, self.cfg.engine.tp, self.cfg.kv,
                             NodeLink(lambda fn: self.loop.call(fn), self._open_pairs, self.curve))
        self.kv_block_bytes = layout.frame_bytes(1, info.num_kv_heads) * info.num_layers  # a block, every layer
        self.engine.on_kv_save = self.kv.on_save_start
        self.kv.start()
        self.loop = EngineLoop(self.engine, self._on_step_thread, self._on_fatal_thread, self.kv.poll)
        self.loop.start()
        self.server = ServerHandle(self.cfg.listen, [self.service_name], creds=self.creds)
        self.add_servicer(self.server.server)
        self.address = await self.server.start()
        if self.cfg.metrics_listen:  # before registering: a port that cannot be bound fails the start
            log.info("metrics on http://%s/metrics", self.metrics.serve(self.cfg.metrics_listen))
        self.agent = NodeAgent(self.cfg.coordinator, self._register_request, self._load,
                               self._on_peers, self._registered, self.report.want_full, creds=self.creds)
        await self.agent.start()
        await self.server.ready()
        log.info("%s node serving on %s", self.kv_role.value, self.address)
        return self.address

    async def close(self, grace_s: float = 5.0) -> None:
        if self.engine is None:
            return
        await asyncio.to_thread(self.metrics.close)
        await self.server.drain(grace_s)
        await self.agent.close()
        self.loop.close()
        self.kv.close()
        await asyncio.to_thread(self.engine.close)
        self.engine = None

    def add_servicer(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def _registered(self, epoch: int) -> None:
        self.report.want_full()  # the new registration knows none of the cache
        self._on_registered(epoch)

    def _on_registered(self, epoch: int) -> None:
        """After every (re-)registration, with the new epoch."""

    def _on_peers(self, peers: list[node_pb2.Peer]) -> None:
        self.peers = {p.node_id: p for p in peers}
        self._peers_changed.set()
        self._peers_changed = asyncio.Event()
        self.kv.on_peers(self.agent.node_id, peers)

    async def listed_peer(self, node_id: str, wait_s: float) -> node_pb2.Peer | None:
        """The peer the coordinator listed under node_id, waiting up to wait_s for the next
        lists (a node that just registered shows at this node's next heartbeat)."""
        deadline = self.aio.time() + wait_s
        while node_id not in self.peers and self.aio.time() < deadline:
            try:
                await asyncio.wait_for(self._peers_changed.wait(), deadline - self.aio.time())
            except asyncio.TimeoutError:
                break
        return self.peers.get(node_id)

    def on_step(self, batch: StepBatch) -> None:
        """Called on the event loop with each engine step's outputs."""

    def _spawn(self, coro) -> None:
        """Run coro in the background, kept referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call(self, fn):
        """Run fn(engine) on the engine thread and await its result."""
        return await asyncio.wrap_future(self.loop.call(fn))

    def _on_step_thread(self, batch: StepBatch) -> None:
        self.aio.call_soon_threadsafe(self.on_step, batch)  # the engine thread only hands the columns over

    def _on_fatal_thread(self, exc: BaseException) -> None:
        log.error("engine failed: %r; exiting", exc)
        self.aio.call_soon_threadsafe(self._fatal)

    def _fatal(self) -> None:
        self.fatal = True
        self.stopped.set()

    def gauges(self) -> dict[str, float]:
        """(any thread: the metrics server's) This node's load now, for NodeMetrics."""
        s, blocks = self.engine.scheduler, self.engine.blocks
        return {"num_requests_running": len(s.running), "num_requests_waiting": len(s.waiting),
                "kv_cache_usage_perc": 1.0 - blocks.num_free / max(1, blocks.num_blocks)}

    async def _open_pairs(self, peer: node_pb2.Peer, req: node_pb2.KVPairsRequest) -> node_pb2.KVPairsResponse:
        """A pairing request to a decode peer, with this node's credentials."""
        from pdserve.v1 import node_pb2_grpc
        ch = channel(peer.address, self.creds)
        try:
            return await node_pb2_grpc.DecodeNodeStub(ch).OpenKVPairs(req, timeout=10.0)
        finally:
            await ch.close()

    def _register_request(self) -> node_pb2.RegisterRequest:
        return node_pb2.RegisterRequest(role=self.role, address=self.address, kv_endpoint=self.kv.endpoint,
                                        tp=self.cfg.engine.tp, model=self.model,
                                        kv_blocks_total=self.engine.blocks.num_blocks, kv_transport=self.kv.name,
                                        kv_curve_key=self.curve.public.decode() if self.curve else "")

    def _load(self) -> node_pb2.HeartbeatRequest:
        s = self.engine.scheduler
        queued_tokens = sum(q.num_tokens - q.num_computed_tokens for q in list(s.waiting))
        return node_pb2.HeartbeatRequest(kv_blocks_free=self.engine.blocks.num_free, running=len(s.running),
                                         queued=len(s.waiting), queued_tokens=queued_tokens,
                                         counters=self.report.counters(), cache=self.report.delta())



def model_info(engine) -> node_pb2.ModelInfo:
    spec = engine.spec
    dtype = str(engine.executor.runner.dtype).removeprefix("torch.")
    return node_pb2.ModelInfo(
        name=engine.cfg.model or DEFAULT_MODEL, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, block_size=engine.cfg.block_size, dtype=dtype, vocab_size=spec.vocab_size,
        max_model_len=engine.max_model_len,
        compat_hash=compat_hash(engine.model_path, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                engine.cfg.block_size, dtype, PROTOCOL_VERSION),
        checkpoint_hash=checkpoint_hash(engine.cfg.model),
        cache_root=engine.hash_root.to_bytes(16, "little") if engine.cfg.prefix_caching else b"")


__all__ = ["NodeBase", "RpcError", "model_info"]
