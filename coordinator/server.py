"""The coordinator process: the client API (Generation) and the node API (Coordinator)."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from pdserve.common.config import CoordinatorConfig
from pdserve.common.prom import MetricsServer
from pdserve.coordinator import metrics
from pdserve.coordinator.admission import Admission
from pdserve.coordinator.lifecycle import Lifecycle
from pdserve.coordinator.model import ServedModel
from pdserve.coordinator.registry import NodeEntry, Registry
from pdserve.coordinator.request import RequestRecord, prepare
from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.wire.rpc import EXPECTED, RpcError, ServerHandle, status_for
from pdserve.wire.security import Credentials
from pdserve.v1 import api_pb2, api_pb2_grpc, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.coordinator")


class Coordinator(api_pb2_grpc.GenerationServicer, node_pb2_grpc.CoordinatorServicer):
    def __init__(self, cfg: CoordinatorConfig):
        self.cfg = cfg
        self.creds = Credentials.member(cfg.security, cfg.api_key, cfg.api_key_file)
        self.registry = Registry(cfg.heartbeat_interval_s, expiry_s=cfg.node_expiry_s, creds=self.creds)
        self.model = ServedModel(cfg.model)
        self.subscriptions: dict[str, asyncio.Task] = {}
        self.background: set[asyncio.Task] = set()
        self.lifecycle = Lifecycle(cfg, self.registry, self._spawn)
        self.requests = self.lifecycle.requests
        self.admission = Admission(cfg.max_inflight, cfg.max_queued)
        self.served = 0  # Generate calls taken
        self.http = None

    async def start(self) -> str:
        self.creds.check_listen(self.cfg.listen, "the coordinator")
        await self.model.start()
        self.server = ServerHandle(self.cfg.listen, ["pdserve.v1.Generation", "pdserve.v1.Coordinator"],
                                   max_receive_bytes=self.cfg.max_request_bytes, creds=self.creds)
        api_pb2_grpc.add_GenerationServicer_to_server(self, self.server.server)
        node_pb2_grpc.add_CoordinatorServicer_to_server(self, self.server.server)
        self.address = await self.server.start()
        await self.server.ready()
        await self.start_http(reuse_port=False)
        self._spawn(self._watch())
        self._spawn(self._renew())
        self.start_metrics()
        return self.address

    def start_metrics(self) -> None:
        """Expose this process's node table with the metrics; serve them on --metrics-listen."""
        exposition = metrics.watch(self.registry)
        self._spawn(self._flush_metrics())
        self.metrics_server = None
        if self.cfg.metrics_listen:
            self.metrics_server = MetricsServer(self.cfg.metrics_listen, exposition)
            log.info("metrics on http://%s/metrics", self.metrics_server.start())

    async def _flush_metrics(self) -> None:
        """Add what the relay tallied (coordinator/metrics.py) every FLUSH_S, and once more at the end."""
        try:
            while True:
                await asyncio.sleep(metrics.FLUSH_S)
                metrics.flush()
        finally:
            metrics.flush()

    async def start_http(self, reuse_port: bool) -> None:
        """The HTTP API on --http-listen, if given (reuse_port: a worker shares the port)."""
        self.http = None
        if self.cfg.http_listen:
            from pdserve.coordinator.http.server import HttpServer
            self.creds.check_http_listen(self.cfg.http_listen)
            self.http = HttpServer(self, self.cfg)
            log.info("HTTP API on %s://%s", self.http.scheme, await self.http.start(reuse_port))

    def routable(self) -> bool:
        """A request could be served now: a live colocated node, or live prefill and decode nodes."""
        roles = {n.role for n in self.registry.nodes.values() if self.registry.healthy(n)}
        return api_pb2.ROLE_BOTH in roles or {api_pb2.ROLE_PREFILL, api_pb2.ROLE_DECODE} <= roles

    async def close(self, grace_s: float = 5.0) -> None:
        if getattr(self, "metrics_server", None) is not None:
            await asyncio.to_thread(self.metrics_server.close)
        await asyncio.gather(self.server.drain(grace_s), *([self.http.close(grace_s)] if self.http else []))
        for task in [*self.subscriptions.values(), *self.background]:
            task.cancel()
        for node_id in list(self.registry.nodes):
            self.registry.remove(node_id)
        self.model.close()

    # node API

    async def Register(self, req: node_pb2.RegisterRequest, context) -> node_pb2.RegisterResponse:
        if req.protocol_version != PROTOCOL_VERSION:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"protocol version {req.protocol_version}, coordinator speaks {PROTOCOL_VERSION}")
        self.registry.refuse_taken(req.address)  # before the model check, which may wait for a load
        live = {n.model.compat_hash for n in self.registry.nodes.values() if self.registry.live(n)}
        await self.model.admit(req.model, live)
        node = self.registry.register(req)  # checks the address again: the load may have taken a while
        for stale in [k for k in self.subscriptions if k not in self.registry.nodes]:
            self.subscriptions.pop(stale).cancel()
        if node.role != api_pb2.ROLE_PREFILL:
            self.subscriptions[node.id] = asyncio.create_task(self._subscribe(node))
        log.info("registered %s node %s at %s", api_pb2.Role.Name(node.role), node.id, node.address)
        return node_pb2.RegisterResponse(node_id=node.id, epoch=node.epoch,
                                         heartbeat_interval_s=self.cfg.heartbeat_interval_s,
                                         **self.registry.peers(node))

    async def Heartbeat(self, req: node_pb2.HeartbeatRequest, context) -> node_pb2.HeartbeatResponse:
        if not self.registry.heartbeat(req):
            return node_pb2.HeartbeatResponse(known=False)
        self.lifecycle.freed()  # its free blocks may have grown
        node = self.registry.nodes[req.node_id]
        return node_pb2.HeartbeatResponse(known=True, want_full_cache=node.cache.want_full, **self.registry.peers(node))

    async def _subscribe(self, node: NodeEntry) -> None:
        """Relay a decode node's per-step token batches to the requests they belong to."""
        try:
            async for batch in node.stub.Subscribe(node_pb2.SubscribeRequest(epoch=node.epoch,
                                                                             subscriber=self.lifecycle.subscriber)):
                if not node.streaming:
                    node.streaming = True  # routable from now on: no token of its can be missed
                    self.stream_opened(node)
                self.lifecycle.deliver(batch, node)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            log.warning("token stream from %s broke: %s", node.id, e.code().name)
        self.lifecycle.node_lost(node, "lost its token stream")

    def stream_opened(self, node: NodeEntry) -> None:
        """A node's token stream to this process is open (a worker tells its supervisor)."""

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _watch(self) -> None:
        """Fence off silent nodes (a frozen or cut-off node whose TCP stream stays open),
        forget long-silent ones, cut off clients that stopped reading."""
        await self.registry.watch("coordinator", lambda n: self.lifecycle.node_lost(n, "missed its heartbeats"),
                                  self._forgotten, self.lifecycle.cut_stalled)

    def _forgotten(self, node: NodeEntry) -> None:
        task = self.subscriptions.pop(node.id, None)
        if task is not None:  # a frozen node's stream may still be open
            task.cancel()

    async def _renew(self) -> None:
        """Renew leases three times per lease: a reservation never lapses while its request waits."""
        while True:
            await asyncio.sleep(self.cfg.lease_s / 3)
            self.lifecycle.renew_due()

    # client API

    async def Status(self, req: api_pb2.StatusRequest, context) -> api_pb2.StatusResponse:
        nodes = [n.status(self.registry.healthy(n)) for n in self.registry.nodes.values()]
        info = self.model.info
        if info is None:
            return api_pb2.StatusResponse(nodes=nodes)
        return api_pb2.StatusResponse(nodes=nodes, model=info.name, vocab_size=info.vocab_size,
                                      max_model_len=info.max_model_len)

    async def generate(self, req: api_pb2.GenerateRequest, context, open_ended: bool = False):
        """The request path of every client API, gRPC Generate and the HTTP API (coordinator/http/):
        one request's responses, first token to last; raises one of EXPECTED for the caller to map.
        context: the call (time_remaining() -> seconds or None; abort(code, message), with which the
        lifecycle ends a client that lags). open_ended: max_tokens 0 asks for the rest of the context."""
        record, admitted = None, False
        self.served += 1
        try:
            await self.admission.acquire(client_of(context))  # RESOURCE_EXHAUSTED with a retry hint when full
            admitted = True
            info, tokenizer = self.model.info, self.model.tokenizer
            if info is None:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "no node has registered yet")
            left = context.time_remaining()
            record = RequestRecord(uuid.uuid4().hex, [], req.sampling, req.client_tag,
                                   None if left is None else time.monotonic() + left)
            record.task, record.context = asyncio.current_task(), context
            self.requests[record.id] = record
            record.prompt, _ = await self.model.run(prepare, req, tokenizer, info, self.cfg.max_tokens_limit,
                                                    open_ended)
            record.run_prompt = record.prompt
            # headers now, not with the first token: a client whose window never opens can
            # still be sent its status (trailers are not flow-controlled, data is)
            await context.send_initial_metadata(())
            async for resp in self.lifecycle.run(record):
                record.writing_since = time.monotonic()
                yield resp
                record.writing_since = None
        except EXPECTED as e:  # the StatusInterceptor turns it into the call's status
            if record is not None:
                record.fail(status_for(e)[0])
            raise
        finally:
            if admitted:
                self.admission.release()
            if record is not None:
                self.requests.pop(record.id, None)
                if not record.terminal:  # the client went away, or its deadline passed
                    left = record.remaining()
                    if left is not None and left <= 0:
                        record.fail(grpc.StatusCode.DEADLINE_EXCEEDED)
                    else:
                        record.cancel()
                metrics.ended(record)
                await self.lifecycle.release(record)

    Generate = generate  # the gRPC method: the same path, no extra hop per response


def client_of(context) -> str:
    """Whom a request counts against for fairness: its connection (host and port)."""
    return context.peer() or "unknown"
