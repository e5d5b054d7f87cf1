"""The prefill node's gRPC servicer."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.llm_engine import StepOutput
from pdserve.kv_transfer.base import Role, TransferState
from pdserve.node.base import NodeBase
from pdserve.wire.protocol import FINISH, to_engine_params
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.prefill")


class PrefillNode(NodeBase, node_pb2_grpc.PrefillNodeServicer):
    role = api_pb2.ROLE_PREFILL
    kv_role = Role.PREFILL
    service_name = "pdserve.v1.PrefillNode"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pending: dict[int, tuple] = {}   # seq_id -> (future of (first StepOutput, exported KV), NCCL sender)
        self.requests: dict[str, object] = {}          # request_id -> Sequence, while prefilling
        self.senders: dict[str, object] = {}           # request_id -> NcclKVSender, while prefilling

    def add_servicer(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_PrefillNodeServicer_to_server(self, server)

    async def Prefill(self, req: node_pb2.PrefillRequest, context) -> node_pb2.PrefillResponse:
        """Prefill, then send the KV and wait for the decode node's acknowledgement, for as
        long as the call's deadline allows. A call cancelled at any point leaves nothing
        behind: the sequence leaves the engine, the sender is failed or withdrawn."""
        prompt, params, rid = list(req.prompt_token_ids), to_engine_params(req.sampling), req.request_id
        ticket = req.ticket  # its lease may have been renewed since: the decode node judges it
        start = time.time()
        sender = None
        if self.nccl:  # the engine sends the KV itself, during the step that completes the prompt
            pairs = await self.kv.ready_pairs(ticket.decode_node_id, wait_s=10.0)
            if pairs is None:
                raise RpcError(grpc.StatusCode.UNAVAILABLE,
                               f"KV transfer: no NCCL pairs open towards decode node {ticket.decode_node_id}")
            nblocks = -(-len(prompt) // self.engine.cfg.block_size)
            sender = self.kv.sender(ticket.kv_endpoint, ticket.transfer_id, ticket.epoch, nblocks, pairs)
        fut = self.aio.create_future()
        added = asyncio.ensure_future(self.call(lambda engine: self._add(engine, prompt, params, rid, fut, sender)))
        try:
            seq = await asyncio.shield(added)
        except asyncio.CancelledError:  # the sequence goes once it is in
            added.add_done_callback(lambda f: self._spawn(self._abort(f.result(), sender))
                                    if not f.cancelled() and f.exception() is None else self._give_up(sender))
            raise
        except BaseException:
            self._give_up(sender)
            raise
        self.requests[rid], self.senders[rid] = seq, sender
        try:
            out, layers = await fut
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(seq, sender))
            raise
        finally:
            self.requests.pop(rid, None)
            self.senders.pop(rid, None)
        resp = node_pb2.PrefillResponse(first_token=out.token_id, prefill_start=start, prefill_end=time.time(),
                                        text=out.text_delta)
        if out.seq.finish_reason != "prefilled":
            resp.finish_reason = FINISH[out.seq.finish_reason]
            return resp
        if sender is None:  # ZeroMQ (NCCL: the step sent the data, the engine thread queued the finish)
            sender = self.kv.sender(ticket.kv_endpoint, ticket.transfer_id, ticket.epoch, layers[0][0].shape[1])
            step = self.cfg.kv_layers_per_message
            for start_layer in range(0, len(layers), step):
                sender.send_layers(start_layer, layers[start_layer:start_layer + step])
            sender.finish(out.token_id)
        try:  # the lease only guards against a vanished coordinator: the call's deadline bounds this wait
            acked = await sender.status.ended_async(context.time_remaining())
        except asyncio.CancelledError:
            self._give_up(sender, "cancelled")
            raise
        if not acked:
            self._give_up(sender, "no acknowledgement before the deadline")
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "no KV acknowledgement from the decode node in time")
        if sender.state != TransferState.DONE:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer to the decode node failed: {sender.error}")
        resp.transfer_end = time.time()
        return resp

    def _give_up(self, sender, why: str = "withdrawn") -> None:
        """End a sender that will not complete: NCCL tells the receiver not to wait; a
        ZeroMQ sender fails, so that the outbox forgets it and drops its shards."""
        if sender is None or sender.status.ended:
            return
        if self.nccl:
            sender.withdraw()
        else:
            sender.fail(why)

    def _add(self, engine, prompt, params, request_id, fut, sender=None):
        kv_send = sender.order if sender is not None else None
        seq = engine.add_request(prompt, params, request_id, prefill_only=True, kv_send=kv_send)
        self.pending[seq.seq_id] = (fut, sender)
        return seq

    def on_step(self, outs: list[StepOutput]) -> None:
        pass  # results are delivered from the engine thread (see _on_step_thread)

    def _on_step_thread(self, outs: list[StepOutput]) -> None:
        # engine thread: export the finished prompts' KV and free their blocks right away
        engine = self.engine
        for out in outs:
            fut, sender = self.pending.pop(out.seq.seq_id, (None, None))
            if fut is None:
                continue
            if sender is not None and out.seq.finish_reason == "prefilled":
                # NCCL: the finish (first token) leaves now, not after a hop to the event loop:
                # the decode side needs it, and the sender is done only once it went out
                sender.finish(out.token_id)
            elif sender is not None:  # ended at its first token: no finish follows the data
                sender.withdraw()
            exported = out.seq.finish_reason == "prefilled" and not self.nccl  # NCCL: sent during the step
            layers = engine.export_kv(out.seq) if exported else None
            engine.release(out.seq)
            self.aio.call_soon_threadsafe(_resolve, fut, (out, layers))

    async def _abort(self, seq, sender) -> None:
        def abort(engine):
            self.pending.pop(seq.seq_id, None)
            unsent, seq.kv_send = seq.kv_send is not None, None  # NCCL: its sends were never issued
            if not seq.is_finished:
                engine.abort(seq)
            return unsent
        if await self.call(abort) and sender is not None:
            sender.withdraw()

    async def Abort(self, req: node_pb2.AbortRequest, context) -> node_pb2.AbortResponse:
        seq = self.requests.get(req.request_id)
        if seq is None:
            return node_pb2.AbortResponse(found=False)
        await self._abort(seq, self.senders.get(req.request_id))
        return node_pb2.AbortResponse(found=True)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
