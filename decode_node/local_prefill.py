"""Prompts a decode-side node prefills in its own engine, with no KV transfer: a
colocated node every prompt, a decode node those whose part missing from its prefix
cache is short (selective disaggregation, --local-prefill-tokens).

Prefill admits the request (chunked prefill joins the running batch) and answers with
its first token; the later tokens go out on the node's per-step token stream, as those
of a request whose KV came from a prefill node. A Prefill call that ends early takes
its sequence out of the engine."""
from __future__ import annotations

import asyncio
import time

import grpc

from pdserve.engine.llm_engine import StepBatch
from pdserve.wire.protocol import FINISH, to_engine_params
from pdserve.wire.rpc import RpcError
from pdserve.v1 import node_pb2


class LocalPrefills:
    def __init__(self, node):
        self.node = node                              # the DecodeNode (or ColocatedNode) that owns them
        self.first: dict[int, asyncio.Future] = {}   # seq_id -> future of its first (token, text, finish reason)

    async def prefill(self, req: node_pb2.PrefillRequest) -> node_pb2.PrefillResponse:
        node = self.node
        prompt, params, rid = list(req.prompt_token_ids), to_engine_params(req.sampling), req.request_id
        start = time.time()
        fut = node.aio.create_future()

        def add(engine):
            seq = engine.add_request(prompt, params, rid)
            seq.kv_ready, seq.decode_start, seq.epoch = 0.0, 0.0, epoch
            self.first[seq.seq_id] = fut
            node.running[rid] = seq  # registered before any step can emit its tokens
            if req.subscriber:
                node.owners[rid] = req.subscriber
            return seq
        epoch = node._epoch(req.ticket.epoch)
        node._arrive(rid)
        try:
            added = asyncio.ensure_future(node.call(add))
            try:
                seq = await asyncio.shield(added)
            except asyncio.CancelledError:
                added.add_done_callback(lambda f: f.cancelled() or f.exception() or self.abandon(f.result()))
                raise
            try:
                node._still_wanted(rid, epoch)
            except RpcError:
                self.abandon(seq)
                raise
        finally:
            node.arriving.discard(rid)
        try:
            token, text, finish = await fut
        except asyncio.CancelledError:
            self.abandon(seq)
            raise
        resp = node_pb2.PrefillResponse(first_token=token, prefill_start=start, prefill_end=time.time(), text=text)
        node.metrics.prompt_tokens.inc(len(prompt))
        if finish is not None:
            resp.finish_reason = FINISH[finish]
        return resp

    def abandon(self, seq) -> None:
        """A Prefill that will not answer: its sequence leaves the engine."""
        node = self.node
        self.first.pop(seq.seq_id, None)
        node.outputs.forget(seq)
        node.owners.pop(seq.request_id, None)
        if node.running.get(seq.request_id) is seq:
            del node.running[seq.request_id]
        node._spawn(node.call(lambda engine: engine.abort(seq)))

    def fail(self, seqs: list, why: str) -> None:
        """Sequences being aborted: a Prefill still waiting for their first token answers now."""
        for seq in seqs:
            fut = self.first.pop(seq.seq_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(RpcError(grpc.StatusCode.ABORTED, f"request {seq.request_id} {why}"))

    def on_step(self, batch: StepBatch) -> list[int]:
        """Answer the Prefill calls whose first token this step made; the rows left to stream."""
        if not self.first:
            running = self.node.running
            return [i for i, seq in enumerate(batch.seqs) if seq.request_id in running]
        node, firsts, later, running = self.node, [], [], self.node.running
        for i, seq in enumerate(batch.seqs):
            fut = self.first.pop(seq.seq_id, None) if batch.indices[i] == 0 else None
            if fut is not None:
                firsts.append((i, fut))
            elif seq.request_id in running:
                later.append(i)
        texts = node.outputs.texts(batch, [i for i, _ in firsts])
        for (i, fut), text in zip(firsts, texts):
            seq = batch.seqs[i]
            seq.decode_start = time.time()
            if batch.finish[i] is not None:
                running.pop(seq.request_id, None)
                node.owners.pop(seq.request_id, None)
            if not fut.done():
                fut.set_result((batch.token_ids[i], text, batch.finish[i]))
        return later
