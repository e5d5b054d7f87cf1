"""The prefill node's gRPC servicer."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.engine.llm_engine import StepBatch
from pdserve.kv_transfer.base.conn import KVUnavailable, Role
from pdserve.kv_transfer.base.status import TransferState
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
        self.pending: dict[int, tuple] = {}   # seq_id -> (future of (first StepOutput, step end), KV sender)
        self.requests: dict[str, object] = {}          # request_id -> Sequence, while prefilling
        self.senders: dict[str, object] = {}           # request_id -> KVSender, while prefilling
        self.sending = 0                               # prompts computed whose KV is not yet acknowledged

    def add_servicer(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_PrefillNodeServicer_to_server(self, server)

    async def Prefill(self, req: node_pb2.PrefillRequest, context) -> node_pb2.PrefillResponse:
        """Prefill, then send the KV and wait for the decode node's acknowledgement, for as
        long as the call's deadline allows. A call cancelled at any point leaves nothing
        behind: the sequence leaves the engine, the sender is failed or withdrawn."""
        prompt, params, rid = list(req.prompt_token_ids), to_engine_params(req.sampling), req.request_id
        ticket = req.ticket  # its lease may have been renewed since: the decode node judges it
        start = time.time()
        skip = ticket.cached_blocks  # the decode node holds these already: they are not sent
        total = max(1, -(-len(prompt) // self.engine.cfg.block_size))
        if skip >= total:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"the ticket says {skip} of the prompt's {total} "
                                                              f"KV blocks are cached: at least one must be sent")
        try:
            sender = await self.kv.sender_for(ticket, total - skip)
        except KVUnavailable as e:
            self.metrics.failed(self.kv.name, f"unavailable: {e}")
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer: {e}") from None
        fut = self.aio.create_future()
        added = asyncio.ensure_future(self.call(lambda engine: self._add(engine, prompt, params, rid, fut, sender,
                                                                         skip)))
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
            out, end = await fut
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(seq, sender))
            raise
        finally:
            self.requests.pop(rid, None)
            self.senders.pop(rid, None)
        resp = node_pb2.PrefillResponse(first_token=out.token_id, prefill_start=start, prefill_end=end,
                                        text=out.text_delta)
        self.metrics.prompt_tokens.inc(len(prompt))
        self.metrics.generation_tokens.inc()
        if out.seq.finish_reason != "prefilled":
            resp.finish_reason = FINISH[out.seq.finish_reason]
            return resp
        # the call's deadline bounds this wait, and the transport's ack timeout where it has one
        # (a link cut under the transfer loses its last messages: no ack would ever come)
        left, ack_timeout = context.time_remaining(), getattr(self.kv, "ack_timeout_s", None)
        wait = ack_timeout if left is None else left if ack_timeout is None else min(left, ack_timeout)
        self.sending += 1
        try:
            acked = await sender.status.ended_async(wait)
        except asyncio.CancelledError:
            self._give_up(sender, "cancelled")
            raise
        finally:
            self.sending -= 1
        if not acked and wait == ack_timeout:
            self._give_up(sender, f"no acknowledgement within {ack_timeout} s")
            self.metrics.failed(self.kv.name, f"timeout: no acknowledgement within {ack_timeout} s")
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer to the decode node failed: no acknowledgement "
                                                        f"within {ack_timeout:g} s (--kv-ack-timeout)")
        if not acked:
            self._give_up(sender, "no acknowledgement before the deadline")
            self.metrics.failed(self.kv.name, "timeout: no acknowledgement before the deadline")
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "no KV acknowledgement from the decode node in time")
        if sender.state != TransferState.DONE:
            self.metrics.failed(self.kv.name, sender.error)
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer to the decode node failed: {sender.error}")
        resp.transfer_end = time.time()
        self.metrics.transferred(self.kv.name, sender.num_blocks, self.kv_block_bytes, resp.transfer_end - end)
        self.report.sent(sender.num_blocks, sender.bytes_sent)
        return resp

    def gauges(self) -> dict[str, float]:
        return {**super().gauges(), "num_requests_in_transfer": self.sending}

    def _give_up(self, sender, why: str = "withdrawn") -> None:
        """End a sender that will not complete (the transport tells the receiver if it must)."""
        if not sender.status.ended:
            sender.withdraw(why)

    def _add(self, engine, prompt, params, request_id, fut, sender, skip):
        seq = engine.add_request(prompt, params, request_id, prefill_only=True, kv_save=sender.save,
                                 kv_skip_blocks=skip)
        self.pending[seq.seq_id] = (fut, sender)
        return seq

    def on_step(self, batch: StepBatch) -> None:
        pass  # results are delivered from the engine thread (see _on_step_thread)

    def _on_step_thread(self, outs: StepBatch) -> None:
        # engine thread: the senders complete (what the step did not send leaves now, with the
        # first token, not after a hop to the event loop), then the prompts' blocks are freed
        engine = self.engine
        for out in outs:
            fut, sender = self.pending.pop(out.seq.seq_id, (None, None))
            if fut is None:
                continue
            seq, end = out.seq, time.time()  # before the finish leaves: the decode node may hear it first
            if seq.finish_reason == "prefilled":
                try:
                    sender.complete(out.token_id, lambda start, n: engine.export_kv(seq, start, n))
                except Exception as e:  # this transfer fails, not the engine
                    log.exception("KV send of %s failed", seq.request_id)
                    sender.fail(f"send failed: {type(e).__name__}: {e}")
            else:  # ended at its first token: no finish follows the data
                sender.withdraw("the request ended at its first token")
            engine.release(seq)
            self.aio.call_soon_threadsafe(_resolve, fut, (out, end))

    async def _abort(self, seq, sender) -> None:
        def abort(engine):
            # not completed yet: a save attached to it was never issued, nothing was sent
            unsent = self.pending.pop(seq.seq_id, None) is not None
            seq.kv_save = None
            if not seq.is_finished:
                engine.abort(seq)
            return unsent
        if await self.call(abort):
            sender.withdraw("aborted")

    async def Abort(self, req: node_pb2.AbortRequest, context) -> node_pb2.AbortResponse:
        seq = self.requests.get(req.request_id)
        if seq is None:
            return node_pb2.AbortResponse(found=False)
        await self._abort(seq, self.senders.get(req.request_id))
        return node_pb2.AbortResponse(found=True)


def _resolve(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
