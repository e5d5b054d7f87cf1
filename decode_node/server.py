"""The decode node's gRPC servicer and request bookkeeping."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import grpc

from engine.llm_engine import StepOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import KVReceiver, Role, TransferState
from pdserve.node_base import NodeBase, abort_with
from pdserve.protocol import FINISH, to_engine_params
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.decode")


@dataclass
class Reservation:
    """Blocks promised to one request until its KV arrives (or the lease ends)."""
    request_id: str
    prompt: list[int]
    params: SamplingParams
    blocks: list[int]
    receiver: KVReceiver


class DecodeNode(NodeBase, node_pb2_grpc.DecodeNodeServicer):
    role = api_pb2.ROLE_DECODE
    kv_role = Role.DECODE
    service_name = "pdserve.v1.DecodeNode"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reservations: dict[str, Reservation] = {}
        self.running: dict[str, object] = {}       # request_id -> Sequence
        self.subscribers: set[asyncio.Queue] = set()
        self.waiters: set[asyncio.Task] = set()    # one per reservation, until its KV arrived or failed

    def add_servicer(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_DecodeNodeServicer_to_server(self, server)

    async def Reserve(self, req: node_pb2.ReserveRequest, context) -> node_pb2.Ticket:
        prompt, params = list(req.prompt_token_ids), to_engine_params(req.sampling)
        if req.request_id in self.reservations or req.request_id in self.running:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {req.request_id} is already here")

        def reserve(engine):
            engine.validate(prompt, params)
            return engine.reserve(len(prompt))
        try:
            blocks = await self.call(reserve)
        except (ValueError, MemoryError) as e:
            await abort_with(context, e)
        transfer_id = uuid.uuid4().hex
        lease = req.lease_s if req.lease_s > 0 else self.cfg.lease_s
        expiry = time.time() + lease
        rx = self.kv.expect(transfer_id, self.agent.epoch, blocks, expiry, self._writer(blocks))
        res = Reservation(req.request_id, prompt, params, blocks, rx)
        self.reservations[req.request_id] = res
        task = asyncio.create_task(self._await_kv(res))
        self.waiters.add(task)
        task.add_done_callback(self.waiters.discard)
        return node_pb2.Ticket(transfer_id=transfer_id, decode_node_id=self.agent.node_id, epoch=self.agent.epoch,
                               block_ids=blocks, kv_endpoint=self.kv.endpoint, lease_expiry=expiry,
                               decode_tp=self.cfg.engine.tp)

    def _writer(self, blocks: list[int]):
        # called on the KV receive thread: the import runs on the engine thread, in arrival order
        def write(layer: int, per_rank) -> None:
            self.loop.call(lambda engine: engine.import_kv(blocks, layer, [per_rank])).result()
        return write

    async def _await_kv(self, res: Reservation) -> None:
        rx = res.receiver
        await rx.status.ended_async()  # the KV manager ends it by the lease at the latest
        kv_ready = time.time()
        if self.reservations.pop(res.request_id, None) is None:
            return  # aborted meanwhile; Abort freed the blocks
        if rx.state == TransferState.FAILED:
            await self.call(lambda engine: engine.release(res.blocks))
            self._publish([_error(res.request_id, grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {rx.error}")])
            return
        def admit(engine):
            out = engine.add_prefilled(res.prompt, rx.first_token, res.params, res.blocks, res.request_id)
            out.seq.kv_ready, out.seq.decode_start = kv_ready, time.time()
            if not out.finished:
                # registered on the engine thread, before any step can produce its tokens
                self.running[res.request_id] = out.seq
            return out
        try:
            out = await self.call(admit)
        except Exception as e:
            await self.call(lambda engine: engine.release(res.blocks))
            self._publish([_error(res.request_id, grpc.StatusCode.INTERNAL, f"admission failed: {e}")])
            return
        if out.finished:
            self._publish([_update(out, out.seq)])

    def on_step(self, outs: list[StepOutput]) -> None:
        updates = []
        for out in outs:
            rid = out.seq.request_id
            if rid not in self.running:
                continue
            updates.append(_update(out, out.seq if out.index == 1 else None))
            if out.finished:
                del self.running[rid]
        if updates:
            self._publish(updates)

    def _publish(self, updates: list[node_pb2.TokenUpdate]) -> None:
        batch = node_pb2.TokenBatch(updates=updates)
        for q in self.subscribers:
            q.put_nowait(batch)

    async def Subscribe(self, req: node_pb2.SubscribeRequest, context):
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        try:
            yield node_pb2.TokenBatch()  # tells the subscriber the stream is live
            while True:
                yield await q.get()
        finally:
            self.subscribers.discard(q)

    async def Abort(self, req: node_pb2.AbortRequest, context) -> node_pb2.AbortResponse:
        res = self.reservations.pop(req.request_id, None)
        if res is not None:
            self.kv.cancel(res.receiver.transfer_id)
            # the blocks go once the transfer ended: at once for ZeroMQ; for NCCL once
            # receives already posted for them have ended
            task = asyncio.create_task(self._release_when_ended(res))
            self.waiters.add(task)
            task.add_done_callback(self.waiters.discard)
            return node_pb2.AbortResponse(found=True)
        seq = self.running.pop(req.request_id, None)
        if seq is not None:
            await self.call(lambda engine: engine.abort(seq))
            return node_pb2.AbortResponse(found=True)
        return node_pb2.AbortResponse(found=False)

    async def _release_when_ended(self, res: Reservation) -> None:
        await res.receiver.status.ended_async()
        await self.call(lambda engine: engine.release(res.blocks))

    async def OpenKVPairs(self, req: node_pb2.KVPairsRequest, context) -> node_pb2.KVPairsResponse:
        if not self.nccl:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this decode node's KV transport is {self.cfg.kv_transport}, not nccl")
        try:
            host, port = self.kv.accept_pairs(req)
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return node_pb2.KVPairsResponse(store_host=host, store_port=port, decode_tp=self.cfg.engine.tp)

    async def close(self, grace_s: float = 5.0) -> None:
        for task in list(self.waiters):
            task.cancel()
        await super().close(grace_s)

    def _load(self) -> node_pb2.HeartbeatRequest:
        load = super()._load()
        load.queued += len(self.reservations)
        return load


def _update(out: StepOutput, first=None) -> node_pb2.TokenUpdate:
    """One token's update; `first` (the sequence) adds its admission times to the first one."""
    return node_pb2.TokenUpdate(request_id=out.seq.request_id, index=out.index,
                                token_id=out.token_id, text=out.text_delta,
                                finish_reason=FINISH.get(out.seq.finish_reason or "", 0) if out.finished else 0,
                                decode_start=first.decode_start if first is not None else 0.0,
                                kv_ready=first.kv_ready if first is not None else 0.0)


def _error(request_id: str, code: grpc.StatusCode, message: str) -> node_pb2.TokenUpdate:
    return node_pb2.TokenUpdate(request_id=request_id, error=message, error_code=code.value[0])
