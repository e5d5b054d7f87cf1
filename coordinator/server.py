"""The coordinator process: the client API (Generation) and the node API (Coordinator)."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import grpc

from coordinator.registry import NodeEntry, Registry
from coordinator.request import DECODE_LOST, RequestRecord, prepare
from pdserve.protocol import PROTOCOL_VERSION
from pdserve.rpc import RpcError, ServerHandle, status_for
from pdserve.v1 import api_pb2, api_pb2_grpc, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.coordinator")


@dataclass
class CoordinatorConfig:
    listen: str = "127.0.0.1:50051"
    model: str | None = None             # tokenizer source; default: what the first node serves
    heartbeat_interval_s: float = 0.5    # a node missing 3 beats is taken out of rotation
    max_inflight: int = 256              # requests admitted at once; more get RESOURCE_EXHAUSTED
    lease_s: float = 30.0                # how long decode blocks wait for their KV
    max_tokens_limit: int = 32768
    max_migrations: int = 2              # times a request may move to another decode node when its node dies


class Coordinator(api_pb2_grpc.GenerationServicer, node_pb2_grpc.CoordinatorServicer):
    def __init__(self, cfg: CoordinatorConfig):
        self.cfg = cfg
        self.registry = Registry(cfg.heartbeat_interval_s)
        self.requests: dict[str, RequestRecord] = {}
        self.tokenizer = None
        self.model: node_pb2.ModelInfo | None = None
        self.subscriptions: dict[str, asyncio.Task] = {}
        self.background: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = ServerHandle(self.cfg.listen, ["pdserve.v1.Generation", "pdserve.v1.Coordinator"])
        api_pb2_grpc.add_GenerationServicer_to_server(self, self.server.server)
        node_pb2_grpc.add_CoordinatorServicer_to_server(self, self.server.server)
        self.address = await self.server.start()
        await self.server.ready()
        self._spawn(self._watch_decode_nodes())
        return self.address

    async def close(self, grace_s: float = 5.0) -> None:
        await self.server.drain(grace_s)
        for task in [*self.subscriptions.values(), *self.background]:
            task.cancel()
        for node_id in list(self.registry.nodes):
            self.registry.remove(node_id)

    # node API

    async def Register(self, req: node_pb2.RegisterRequest, context) -> node_pb2.RegisterResponse:
        if req.protocol_version != PROTOCOL_VERSION:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"protocol version {req.protocol_version}, coordinator speaks {PROTOCOL_VERSION}")
        if self.model is not None and req.model.compat_hash != self.model.compat_hash:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"node serves a different model/layout ({req.model.name or 'default'}) "
                                f"than the cluster ({self.model.name or 'default'})")
        if self.model is None:
            self.model = req.model
            self.tokenizer = await asyncio.to_thread(_load_tokenizer, self.cfg.model or req.model.name)
        node = self.registry.register(req)
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
        return node_pb2.HeartbeatResponse(known=True, **self.registry.peers(self.registry.nodes[req.node_id]))

    async def _subscribe(self, node: NodeEntry) -> None:
        """Relay a decode node's per-step token batches to the requests they belong to."""
        try:
            async for batch in node.stub.Subscribe(node_pb2.SubscribeRequest()):
                node.streaming = True  # routable from now on: no token of its can be missed
                for update in batch.updates:
                    record = self.requests.get(update.request_id)
                    if record is not None and record.decode is node and not record.lost:  # moved on: fenced off
                        record.updates.put_nowait(update)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            log.warning("token stream from %s broke: %s", node.id, e.code().name)
        node.down, node.streaming = True, False
        for record in list(self.requests.values()):
            if record.decode is node and not record.lost:
                record.lost = True
                record.updates.put_nowait(DECODE_LOST)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _watch_decode_nodes(self) -> None:
        """A decode node that stopped heartbeating (frozen, cut off) while its TCP stream
        stays open: its requests move to another decode node, as if it had died."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            for record in list(self.requests.values()):
                node = record.decode
                if (node is not None and record.state == "DECODING" and not record.lost
                        and time.monotonic() - node.last_seen > self.registry.timeout):
                    log.warning("decode node %s missed its heartbeats", node.id)
                    record.lost = True
                    record.updates.put_nowait(DECODE_LOST)

    # client API

    async def Status(self, req: api_pb2.StatusRequest, context) -> api_pb2.StatusResponse:
        nodes = [n.status(self.registry.healthy(n)) for n in self.registry.nodes.values()]
        if self.model is None:
            return api_pb2.StatusResponse(nodes=nodes)
        return api_pb2.StatusResponse(nodes=nodes, model=self.model.name, vocab_size=self.model.vocab_size,
                                      max_model_len=self.model.max_model_len)

    async def Generate(self, req: api_pb2.GenerateRequest, context):
        record = None
        try:
            if self.model is None:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "no node has registered yet")
            prompt, params = prepare(req, self.tokenizer, self.model, self.cfg.max_tokens_limit)
            if len(self.requests) >= self.cfg.max_inflight:
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{len(self.requests)} requests in flight (limit {self.cfg.max_inflight})")
            record = RequestRecord(uuid.uuid4().hex, prompt, req.sampling, req.client_tag)
            self.requests[record.id] = record
            async for resp in self._run(record):
                yield resp
        except (RpcError, ValueError) as e:
            if record is not None:
                record.fail()
            code, message = status_for(e)
            await context.abort(code, message)
        finally:
            if record is not None:
                self.requests.pop(record.id, None)
                if not record.terminal:
                    record.cancel()
                await self._release(record)

    async def _run(self, record: RequestRecord):
        await self._reserve(record)
        first = await self._prefill(record)
        yield record.first_response(first)
        if first.finish_reason:  # the first token ended it: the decode reservation is not needed
            record.finish()
            await self._abort(record.decode, record)
            yield record.last_response(first.finish_reason)
            return
        next_index = 1
        while True:
            update = await record.updates.get()
            batch = [update]
            while not record.updates.empty():
                batch.append(record.updates.get_nowait())
            resp, finish, lost = record.relay(batch, next_index)
            if resp is not None:
                next_index = resp.index + len(resp.token_ids)
                yield resp
            if not finish and lost:
                first = await self._migrate(record)
                yield record.continued_response(first)
                next_index = record.offset + 1
                finish = first.finish_reason
                if finish:
                    await self._abort(record.decode, record)
            if finish:
                record.finish()
                yield record.last_response(finish)
                return

    async def _migrate(self, record: RequestRecord) -> node_pb2.PrefillResponse:
        """The decode node died mid-stream: prefill the prompt and the tokens sent so far
        again, for another decode node, which continues from the next output index (greedy
        requests continue exactly; seeded sampling does not replay its draws)."""
        gone = record.decode
        if record.migrations >= self.cfg.max_migrations:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"decode node {gone.id} is gone")
        gone.inflight -= 1
        record.migrate()
        log.info("request %s moves off decode node %s after %d tokens", record.id, gone.id, record.offset)
        self._spawn(self._abort(gone, record))  # a frozen node frees it when it wakes
        await self._reserve(record)
        return await self._prefill(record)

    async def _reserve(self, record: RequestRecord) -> None:
        sampling = record.run_sampling
        for node in self.registry.candidates(api_pb2.ROLE_DECODE):
            try:
                ticket = await node.stub.Reserve(node_pb2.ReserveRequest(
                    request_id=record.id, prompt_token_ids=record.run_prompt, sampling=sampling,
                    lease_s=self.cfg.lease_s), timeout=10.0)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RpcError(e.code(), e.details())
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    node.down = True
                continue
            record.reserved(node, ticket)
            node.inflight += 1
            return
        raise RpcError(grpc.StatusCode.UNAVAILABLE if not self.registry.candidates(api_pb2.ROLE_DECODE)
                       else grpc.StatusCode.RESOURCE_EXHAUSTED, "no decode node could take the request")

    async def _prefill(self, record: RequestRecord) -> node_pb2.PrefillResponse:
        """Run the prompt on a prefill node; a node that is down is skipped while the lease lasts."""
        tried = set()
        colocated = record.decode.role == api_pb2.ROLE_BOTH
        while True:
            nodes = [record.decode] if colocated else \
                [n for n in self.registry.candidates(api_pb2.ROLE_PREFILL) if n.id not in tried]
            if not nodes:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "no prefill node is available")
            node = nodes[0]
            tried.add(node.id)
            record.prefilling(node)
            node.inflight += 1
            try:
                resp = await node.prefill_stub.Prefill(node_pb2.PrefillRequest(
                    request_id=record.id, prompt_token_ids=record.run_prompt, sampling=record.run_sampling,
                    ticket=record.ticket, keep_kv=colocated),
                    timeout=None if colocated else max(0.1, record.ticket.lease_expiry - time.time()))
                record.prefilled(resp)
                return resp
            except grpc.aio.AioRpcError as e:
                if colocated or e.code() != grpc.StatusCode.UNAVAILABLE or "KV transfer" in (e.details() or ""):
                    raise RpcError(e.code(), f"prefill failed: {e.details()}")
                node.down = True  # the node itself is unreachable: try another
            finally:
                node.inflight -= 1
                record.prefill = None

    async def _release(self, record: RequestRecord) -> None:
        """After the request ended: stop any work still running for it on the nodes."""
        if record.decode is not None:
            record.decode.inflight -= 1
        if record.state != "FINISHED":
            await asyncio.gather(self._abort(record.decode, record), self._abort(record.prefill, record))

    async def _abort(self, node: NodeEntry | None, record: RequestRecord) -> None:
        if node is None or self.registry.nodes.get(node.id) is not node:
            return
        try:
            await node.stub.Abort(node_pb2.AbortRequest(request_id=record.id), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            log.debug("abort of %s on %s failed: %s", record.id, node.id, e.code().name)


def _load_tokenizer(model: str):
    from engine.loader import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model(model or None))
