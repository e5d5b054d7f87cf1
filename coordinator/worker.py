"""One frontend process of `pdserve coordinator --workers N`.

It serves the client API on the coordinator's port, shared with the other workers
through SO_REUSEPORT (the kernel spreads connections over them), and runs its own
requests end to end: tokenizing, routing, its own token stream from every decode
node (under its own subscriber id, so a node sends it only its requests' tokens and
frees them if this process dies), migration, deadlines, cancellation. Node
registrations and heartbeats that land here are forwarded to the supervisor, whose
node table it mirrors (mirror.py); a node this worker finds lost is fenced off
through the supervisor for every worker. Status is the supervisor's answer. Without
its supervisor (its table stream ended) the worker stops."""
from __future__ import annotations

import asyncio
import logging
import os

import grpc

from pdserve.common.config import CoordinatorConfig
from pdserve.coordinator.mirror import Mirror
from pdserve.coordinator.registry import NodeEntry
from pdserve.coordinator.server import Coordinator
from pdserve.wire.rpc import RpcError, ServerHandle, channel
from pdserve.wire.security import Credentials
from pdserve.v1 import api_pb2, api_pb2_grpc, node_pb2, node_pb2_grpc, supervisor_pb2, supervisor_pb2_grpc

log = logging.getLogger("pdserve.coordinator")

STREAMS_WAIT_S = 10.0  # at start: how long to wait for the token streams of the live decode nodes


class Worker(Coordinator):
    def __init__(self, cfg: CoordinatorConfig, supervisor: str, index: int, subscriber: str, link_token: str = ""):
        """link_token: what the supervisor's loopback server asks of its workers (it writes it to their stdin)."""
        super().__init__(cfg)
        self.link = Credentials(secret=link_token.encode() or None)
        self.supervisor, self.index = supervisor, index
        self.lifecycle.subscriber = subscriber
        self.lifecycle.on_lost = self._fence
        self.mirror = Mirror(self.registry, self.lifecycle, self.model, self._open_stream, self._close_stream)
        self.ready = False
        self.closing = False
        self.fatal = False
        self.stopped = asyncio.Event()   # the supervisor is gone: run_until_signal ends the process
        self._report_now = asyncio.Event()

    async def start(self) -> str:
        await self.model.start()
        self.sup_channel = channel(self.supervisor, self.link)
        self.sup = supervisor_pb2_grpc.SupervisorStub(self.sup_channel)
        self.sup_nodes = node_pb2_grpc.CoordinatorStub(self.sup_channel)
        self._spawn(self._follow())
        await asyncio.wait_for(self.mirror.first.wait(), 30.0)
        if not await self.mirror.wait_streaming(STREAMS_WAIT_S):
            log.warning("worker %d starts before every decode node's token stream opened", self.index)
        self.server = ServerHandle(self.cfg.listen, ["pdserve.v1.Generation", "pdserve.v1.Coordinator"],
                                   max_receive_bytes=self.cfg.max_request_bytes, options=(("grpc.so_reuseport", 1),),
                                   creds=self.creds)
        api_pb2_grpc.add_GenerationServicer_to_server(self, self.server.server)
        node_pb2_grpc.add_CoordinatorServicer_to_server(self, self.server.server)
        self.address = await self.server.start()
        await self.server.ready()
        await self.start_http(reuse_port=True)
        self.ready = True
        self._spawn(self._watch())
        self._spawn(self._renew())
        self._spawn(self._reporting())
        self.start_metrics()  # the values go to the supervisor's directory (its environment names it)
        log.info("worker %d (pid %d) serves %s", self.index, os.getpid(), self.address)
        return self.address

    async def close(self, grace_s: float = 5.0) -> None:
        """Drain (SIGTERM from the supervisor); without a supervisor, stop at once, as a
        coordinator that crashed: nothing would fence a node that dies meanwhile."""
        self.closing = True
        await super().close(0.0 if self.fatal else grace_s)
        await self.sup_channel.close()

    # the node table and this worker's token streams

    async def _follow(self) -> None:
        try:
            async for table in self.sup.WatchNodes(supervisor_pb2.WatchRequest(worker=self.index)):
                await self.mirror.apply(table)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            log.error("worker %d lost its supervisor: %s", self.index, e.code().name)
        if not self.closing:
            self.fatal = True
            self.stopped.set()

    def _open_stream(self, node: NodeEntry) -> None:
        self.subscriptions[node.id] = asyncio.create_task(self._subscribe(node))

    def _close_stream(self, node_id: str) -> None:
        task = self.subscriptions.pop(node_id, None)
        if task is not None:
            task.cancel()

    def stream_opened(self, node: NodeEntry) -> None:
        self._report_now.set()

    def _fence(self, node: NodeEntry, why: str) -> None:
        self._report_now.set()
        self._spawn(self._send_fence(node, why))

    async def _send_fence(self, node: NodeEntry, why: str) -> None:
        try:
            await self.sup.Fence(supervisor_pb2.FenceRequest(node_id=node.id, epoch=node.epoch, reason=why,
                                                             worker=self.index), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            log.warning("could not tell the supervisor that node %s %s: %s", node.id, why, e.code().name)

    async def _reporting(self) -> None:
        """Tell the supervisor what this worker streams and serves: at once when a stream
        opens or a node is lost, else once per heartbeat interval."""
        while True:
            try:
                await asyncio.wait_for(self._report_now.wait(), self.cfg.heartbeat_interval_s)
            except asyncio.TimeoutError:
                pass
            self._report_now.clear()
            # a node counts as streamed once this worker can also tokenize for its model
            streaming = [n.id for n in self.registry.nodes.values() if n.streaming and not n.down
                         and self.model.info is not None and n.model.compat_hash == self.model.info.compat_hash]
            report = supervisor_pb2.WorkerReport(worker=self.index, pid=os.getpid(), ready=self.ready,
                                                 served=self.served, inflight=len(self.requests), streaming=streaming)
            try:
                await self.sup.Report(report, timeout=max(1.0, self.cfg.heartbeat_interval_s))
            except grpc.aio.AioRpcError as e:
                log.warning("report to the supervisor failed: %s", e.code().name)

    async def _watch(self) -> None:
        """Cut off clients that stopped reading; the supervisor watches the nodes."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            self.lifecycle.cut_stalled()

    # the node API and status: the supervisor's

    async def Register(self, req: node_pb2.RegisterRequest, context) -> node_pb2.RegisterResponse:
        return await self._forward(self.sup_nodes.Register, req, context)

    async def Heartbeat(self, req: node_pb2.HeartbeatRequest, context) -> node_pb2.HeartbeatResponse:
        return await self._forward(self.sup_nodes.Heartbeat, req, context)

    async def Status(self, req: api_pb2.StatusRequest, context) -> api_pb2.StatusResponse:
        return await self._forward(self.sup.Status, req, context)

    async def _forward(self, call, req, context):
        left = context.time_remaining()
        try:
            return await call(req, timeout=10.0 if left is None else max(0.001, left))
        except grpc.aio.AioRpcError as e:
            raise RpcError(e.code(), e.details() or "the supervisor did not answer") from None
