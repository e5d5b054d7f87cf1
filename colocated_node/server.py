"""Colocated node (`--role both`): prefill and decode of a request in one engine,
one continuous batch with chunked prefill, no KV transfer. It is the baseline that
disaggregated goodput is measured against.

It speaks both node APIs to the coordinator: Reserve only validates (the engine
allocates blocks as it schedules), Prefill admits the request and answers with its
first token, and the later tokens go out on the same per-step token stream as a
decode node's."""
from __future__ import annotations

import asyncio
import time

import grpc

from pdserve.decode_node.server import DecodeNode
from pdserve.engine.llm_engine import StepBatch
from pdserve.wire.protocol import FINISH, to_engine_params
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc


class ColocatedNode(DecodeNode, node_pb2_grpc.PrefillNodeServicer):
    role = api_pb2.ROLE_BOTH
    service_name = "pdserve.v1.DecodeNode"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.first: dict[int, asyncio.Future] = {}   # seq_id -> future of its first (token, text, finish reason)

    def add_servicer(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_DecodeNodeServicer_to_server(self, server)
        node_pb2_grpc.add_PrefillNodeServicer_to_server(self, server)

    async def Reserve(self, req: node_pb2.ReserveRequest, context) -> node_pb2.Ticket:
        prompt, params = list(req.prompt_token_ids), to_engine_params(req.sampling)
        epoch = self._epoch(req.epoch)
        if self.aborted.discard(req.request_id):
            raise RpcError(grpc.StatusCode.ABORTED, f"request {req.request_id} was aborted")
        await self.call(lambda engine: engine.validate(prompt, params))
        return node_pb2.Ticket(decode_node_id=self.agent.node_id, epoch=epoch,
                               lease_expiry=self._lease_expiry(req.lease_s), decode_tp=self.cfg.engine.tp)

    async def Renew(self, req: node_pb2.RenewRequest, context) -> node_pb2.RenewResponse:
        self._epoch(req.epoch)  # Reserve holds nothing here: there is no lease to extend
        return node_pb2.RenewResponse(lease_expiry=self._lease_expiry(req.lease_s))

    async def Prefill(self, req: node_pb2.PrefillRequest, context) -> node_pb2.PrefillResponse:
        prompt, params, rid = list(req.prompt_token_ids), to_engine_params(req.sampling), req.request_id
        start = time.time()
        fut = self.aio.create_future()

        def add(engine):
            seq = engine.add_request(prompt, params, rid)
            seq.kv_ready, seq.decode_start, seq.epoch = 0.0, 0.0, epoch
            self.first[seq.seq_id] = fut
            self.running[rid] = seq  # registered before any step can emit its tokens
            if req.subscriber:
                self.owners[rid] = req.subscriber
            return seq
        epoch = self._epoch(req.ticket.epoch)
        self._arrive(rid)
        try:
            added = asyncio.ensure_future(self.call(add))
            try:
                seq = await asyncio.shield(added)
            except asyncio.CancelledError:
                added.add_done_callback(lambda f: f.cancelled() or f.exception() or self._abandon(f.result()))
                raise
            try:
                self._still_wanted(rid, epoch)
            except RpcError:
                self._abandon(seq)
                raise
        finally:
            self.arriving.discard(rid)
        try:
            token, text, finish = await fut
        except asyncio.CancelledError:
            self._abandon(seq)
            raise
        resp = node_pb2.PrefillResponse(first_token=token, prefill_start=start, prefill_end=time.time(), text=text)
        self.metrics.prompt_tokens.inc(len(prompt))
        if finish is not None:
            resp.finish_reason = FINISH[finish]
        return resp

    def _abandon(self, seq) -> None:
        """A Prefill that will not answer: its sequence leaves the engine."""
        self.first.pop(seq.seq_id, None)
        self.outputs.forget(seq)
        self.owners.pop(seq.request_id, None)
        if self.running.get(seq.request_id) is seq:
            del self.running[seq.request_id]
        self._spawn(self.call(lambda engine: engine.abort(seq)))

    async def _abort_running(self, seqs: list, why: str) -> None:
        for seq in seqs:  # a Prefill still waiting for the first token answers at once
            fut = self.first.pop(seq.seq_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(RpcError(grpc.StatusCode.ABORTED, f"request {seq.request_id} {why}"))
        await super()._abort_running(seqs, why)

    def on_step(self, batch: StepBatch) -> None:
        firsts, later, running = [], [], self.running
        for i, seq in enumerate(batch.seqs):
            fut = self.first.pop(seq.seq_id, None) if batch.indices[i] == 0 else None
            if fut is not None:
                firsts.append((i, fut))
            elif seq.request_id in running:
                later.append(i)
        self.metrics.generation_tokens.inc(len(firsts) + len(later))  # once per step
        texts = self.outputs.texts(batch, [i for i, _ in firsts])
        for (i, fut), text in zip(firsts, texts):
            seq = batch.seqs[i]
            seq.decode_start = time.time()
            if batch.finish[i] is not None:
                running.pop(seq.request_id, None)
                self.owners.pop(seq.request_id, None)
            if not fut.done():
                fut.set_result((batch.token_ids[i], text, batch.finish[i]))
        self._emit(batch, later)
