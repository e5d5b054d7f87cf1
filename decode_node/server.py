"""The decode node's gRPC servicer and request bookkeeping.

Every reservation and running request belongs to the registration epoch it was handed
out under. Requests of an epoch are aborted and freed when nobody can receive their
tokens any more: the node registered anew (that coordinator forgot it), or the last
Subscribe stream of that epoch ended. A request reserved for a subscriber (a
coordinator worker) streams to that subscriber's Subscribe calls only, and is aborted
when the last of them ends."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from functools import cached_property

import grpc

from pdserve.decode_node.local_prefill import LocalPrefills
from pdserve.decode_node.outputs import StepOutputs, error_batch, first_batch
from pdserve.decode_node.subscribers import Subscriber
from pdserve.engine.llm_engine import StepBatch
from pdserve.common.config import LEASE_S
from pdserve.common.sampling import SamplingParams
from pdserve.kv_transfer.base.conn import KVReceiver, Role
from pdserve.kv_transfer.base.status import TransferState
from pdserve.node.base import NodeBase
from pdserve.wire.protocol import to_engine_params
from pdserve.common.recent_ids import RecentIds
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.decode")


@dataclass
class Reservation:
    """Blocks promised to one request until its KV arrives (or the lease ends): the
    leading ones linked from the prefix cache, then those the transfer fills."""
    request_id: str
    prompt: list[int]
    params: SamplingParams
    blocks: list[int]
    receiver: KVReceiver
    epoch: int
    dropped: bool = False   # aborted while being admitted: abort the sequence it became


class DecodeNode(NodeBase, node_pb2_grpc.DecodeNodeServicer, node_pb2_grpc.PrefillNodeServicer):
    role = api_pb2.ROLE_DECODE
    kv_role = Role.DECODE
    service_name = "pdserve.v1.DecodeNode"
    engine_detokenizes = False  # StepOutputs does, on the event loop

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reservations: dict[str, Reservation] = {}
        self.admitting: dict[str, Reservation] = {}  # KV arrived, joining the batch
        self.running: dict[str, object] = {}       # request_id -> Sequence (seq.epoch set at admission)
        self.subscribers: set[Subscriber] = set()
        self.owners: dict[str, str] = {}           # request_id -> the subscriber id it streams to (absent: all)
        self.arriving: set[str] = set()            # Reserve (colocated: Prefill) calls in flight
        self.aborted = RecentIds()                 # aborted before they arrived: refused when they do
        self.seen = RecentIds()                    # arrived lately: a late Abort leaves no tombstone
        self.closing = False
        self.local = LocalPrefills(self)              # prompts prefilled here (no transfer)

    def add_servicer(self, server: grpc.aio.Server) -> None:
        node_pb2_grpc.add_DecodeNodeServicer_to_server(self, server)
        node_pb2_grpc.add_PrefillNodeServicer_to_server(self, server)  # local prefills

    @cached_property
    def outputs(self) -> StepOutputs:
        return StepOutputs(self.engine.tokenizer)  # first used once the engine runs

    # epochs and tombstones

    def _epoch(self, epoch: int) -> int:
        """The epoch a call belongs to (0: the current one); FAILED_PRECONDITION if stale."""
        current = self.agent.epoch
        if epoch in (0, current):
            return current
        if epoch > current and any(s.epoch == epoch for s in self.subscribers):
            return epoch  # registered anew: the coordinator subscribed before its answer got here
        raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"stale epoch {epoch}: this node is registered under epoch {current}")

    def _arrive(self, request_id: str) -> None:
        """A Reserve or Prefill for request_id starts; ABORTED if it was aborted already."""
        if self.aborted.discard(request_id):
            raise RpcError(grpc.StatusCode.ABORTED, f"request {request_id} was aborted")
        if any(request_id in d for d in (self.arriving, self.reservations, self.admitting, self.running)):
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id} is already here")
        self.arriving.add(request_id)
        self.seen.add(request_id)

    def _still_wanted(self, request_id: str, epoch: int) -> None:
        """After an await: raise if the request was aborted or its epoch fenced meanwhile."""
        if self.aborted.discard(request_id):
            raise RpcError(grpc.StatusCode.ABORTED, f"request {request_id} was aborted")
        self._epoch(epoch)

    # reserve, renew

    async def Reserve(self, req: node_pb2.ReserveRequest, context) -> node_pb2.Ticket:
        prompt, params, rid = list(req.prompt_token_ids), to_engine_params(req.sampling), req.request_id
        epoch = self._epoch(req.epoch)
        self._arrive(rid)
        try:
            blocks, cached = await self._take_blocks(prompt, params)
            if blocks is None:  # short enough to prefill here: the coordinator sends Prefill to this node
                self._still_wanted(rid, epoch)
                return node_pb2.Ticket(decode_node_id=self.agent.node_id, epoch=epoch, local_prefill=True,
                                       lease_expiry=self._lease_expiry(req.lease_s), decode_tp=self.cfg.engine.tp)
            try:
                self._still_wanted(rid, epoch)
                left = context.time_remaining()
                if left is not None and left <= 0:  # the answer would go nowhere
                    raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while reserving")
            except RpcError:
                self._release(blocks)
                raise
        finally:
            self.arriving.discard(rid)
        transfer_id = uuid.uuid4().hex
        expiry = self._lease_expiry(req.lease_s)
        fresh = blocks[cached:]  # what the transfer fills; the cached ones are only read
        rx = self.kv.expect(transfer_id, epoch, fresh, expiry, self._writer(fresh))
        res = Reservation(rid, prompt, params, blocks, rx, epoch)
        self.reservations[rid] = res
        if req.subscriber:
            self.owners[rid] = req.subscriber
        self._spawn(self._await_kv(res))
        return node_pb2.Ticket(transfer_id=transfer_id, decode_node_id=self.agent.node_id, epoch=epoch,
                               block_ids=fresh, kv_endpoint=self.kv.endpoint, lease_expiry=expiry,
                               decode_tp=self.cfg.engine.tp, cached_blocks=cached,
                               kv_curve_key=self.curve.public.decode() if self.curve else "")

    async def _take_blocks(self, prompt: list[int], params: SamplingParams) -> tuple[list[int] | None, int]:
        """The prompt's blocks and how many leading ones were linked from the prefix cache
        (their KV is not sent), if the rest still lets every running sequence and
        reservation grow by a block (MemoryError otherwise); (None, cached) where at most
        --local-prefill-tokens of the prompt are not cached: this node prefills it. Blocks
        taken by a call cancelled meanwhile are released."""
        held = len(self.reservations) + len(self.admitting) + len(self.arriving) - 1  # others, in flight too

        def reserve(engine):
            engine.validate(prompt, params)
            cached = engine.cached_prefix(prompt)
            if len(prompt) - len(cached) * engine.blocks.block_size <= self.cfg.local_prefill_tokens:
                return None, len(cached)  # its admission counts its cache hit
            engine.blocks.count_hit(len(prompt), len(cached) * engine.blocks.block_size)
            need = engine.blocks_needed(len(prompt), cached)
            total = engine.blocks.blocks_for(len(prompt))
            own = min(1, engine.blocks.blocks_for(len(prompt) + params.max_tokens) - total)
            keep = held + len(engine.scheduler.running) + len(engine.scheduler.waiting) + own
            free = engine.blocks.num_free
            if free - need < keep:
                raise MemoryError(f"decode node full: {free} KV blocks free, the prompt needs {need} and "
                                  f"{keep} must stay free for running sequences and reservations to grow")
            return engine.reserve(len(prompt), cached), len(cached)
        fut = asyncio.wrap_future(self.loop.call(reserve))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result()[0] is None
                                  or self._release(f.result()[0]))
            raise

    def _lease_expiry(self, lease_s: float) -> float:
        """When a lease asked for now ends (0: the node's default lease)."""
        return time.time() + (lease_s if lease_s > 0 else LEASE_S)

    def _release(self, blocks: list[int]) -> None:
        self.loop.call(lambda engine: engine.release(blocks))

    async def Renew(self, req: node_pb2.RenewRequest, context) -> node_pb2.RenewResponse:
        epoch = self._epoch(req.epoch)
        expiry = self._lease_expiry(req.lease_s)
        missing = []
        for rid in req.request_ids:
            res = self.reservations.get(rid)
            if res is not None and res.epoch == epoch:
                res.receiver.lease_expiry = expiry  # the KV manager's sweep (NCCL: its cancel too) reads it
                if not res.receiver.status.ended:  # neither expired nor arrived already
                    continue
            missing.append(rid)
        return node_pb2.RenewResponse(missing=missing, lease_expiry=expiry)

    def _writer(self, blocks: list[int]):
        # called on the KV receive thread: writes without waiting for the engine thread
        # (LLMEngine.write_kv); admission puts the KV in place on every rank first
        engine = self.engine
        return lambda layer, per_rank: engine.write_kv(blocks, layer, [per_rank])

    async def _await_kv(self, res: Reservation) -> None:
        rx, rid = res.receiver, res.request_id
        await rx.status.ended_async()  # the KV manager ends it by the lease at the latest
        kv_ready = time.time()
        if self.reservations.get(rid) is not res:
            return  # aborted meanwhile; Abort freed the blocks
        del self.reservations[rid]
        if rx.state == TransferState.FAILED:
            self.metrics.failed(self.kv.name, rx.error)
            await self.call(lambda engine: engine.release(res.blocks))
            self._publish(error_batch(rid, grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {rx.error}"),
                          self.owners.pop(rid, ""))
            return

        self.metrics.transferred(self.kv.name, len(res.blocks), self.kv_block_bytes, None)

        def admit(engine):
            if res.dropped:  # aborted while its admission was queued
                engine.release(res.blocks)
                return None
            out = engine.add_prefilled(res.prompt, rx.first_token, res.params, res.blocks, rid)
            out.seq.kv_ready, out.seq.decode_start, out.seq.epoch = kv_ready, time.time(), res.epoch
            if not out.finished:
                # registered on the engine thread, before any step can produce its tokens
                self.running[rid] = out.seq
            return out
        self.admitting[rid] = res
        try:
            out = await self.call(admit)
        except Exception as e:
            await self.call(lambda engine: engine.release(res.blocks))
            self._publish(error_batch(rid, grpc.StatusCode.INTERNAL, f"admission failed: {e}"),
                          self.owners.pop(rid, ""))
            return
        finally:
            self.admitting.pop(rid, None)
        if out is None or res.dropped:
            self.owners.pop(rid, None)
        if out is None:
            return
        if res.dropped and self.running.pop(rid, None) is not None:  # aborted as it was admitted
            await self._abort_running([out.seq], "aborted")
        elif out.finished:
            self._publish(first_batch(out), self.owners.pop(rid, ""))

    # token streams

    async def Prefill(self, req: node_pb2.PrefillRequest, context) -> node_pb2.PrefillResponse:
        """A prompt this node prefills itself (Reserve said local_prefill; a colocated node: all)."""
        if self.role == api_pb2.ROLE_DECODE:
            self.report.local_prefills += 1
        return await self.local.prefill(req)

    def on_step(self, batch: StepBatch) -> None:
        running = self.running  # counted before local prefills' finished requests leave it
        self.metrics.generation_tokens.inc(sum(seq.request_id in running for seq in batch.seqs))  # once per step
        self._emit(batch, self.local.on_step(batch))

    def _emit(self, batch: StepBatch, rows: list[int]) -> None:
        """Publish these rows of a step, one TokenBatch per subscriber id that owns some of
        them; finished requests leave self.running and self.owners."""
        if not rows:
            return
        groups: dict[str, list[int]] = {}
        for i in rows:
            groups.setdefault(self.owners.get(batch.seqs[i].request_id, ""), []).append(i)
        for owner, mine in groups.items():
            self._publish(self.outputs.token_batch(batch, mine), owner)
        for i in rows:
            if batch.finish[i] is not None:
                rid = batch.seqs[i].request_id
                del self.running[rid]
                self.owners.pop(rid, None)

    def _publish(self, batch: node_pb2.TokenBatch, owner: str = "") -> None:
        """To the subscribers of this id ("" : to every subscriber)."""
        for sub in list(self.subscribers):
            if (not owner or sub.id == owner) and not sub.put(batch):
                self.subscribers.discard(sub)

    async def Subscribe(self, req: node_pb2.SubscribeRequest, context) -> None:
        sub = Subscriber(req.epoch or self.agent.epoch, self.cfg.max_unread_batches, req.subscriber)
        self.subscribers.add(sub)
        why = "its stream ended"
        try:
            await sub.stream(context)
            why = f"its subscriber fell {sub.limit} token batches behind"
            log.warning("token stream of epoch %d ended: %s", sub.epoch, why)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{sub.limit} token batches unread: the subscription is ended")
        finally:
            self.subscribers.discard(sub)
            if not self.closing and sub.id and not any(s.id == sub.id for s in self.subscribers):
                self._drop(lambda e, rid: self.owners.get(rid) == sub.id,
                           f"the last stream of subscriber {sub.id} ended: {why}")
            if not self.closing and not any(s.epoch == sub.epoch for s in self.subscribers):
                self._drop(lambda e, rid: e == sub.epoch, f"the last subscription of epoch {sub.epoch} ended: {why}")

    # aborts

    async def Abort(self, req: node_pb2.AbortRequest, context) -> node_pb2.AbortResponse:
        rid = req.request_id
        self.owners.pop(rid, None)
        res = self.reservations.pop(rid, None)
        if res is not None:
            self._cancel_reservation(res)
            return node_pb2.AbortResponse(found=True)
        if rid in self.admitting:
            self.admitting[rid].dropped = True
            return node_pb2.AbortResponse(found=True)
        seq = self.running.pop(rid, None)
        if seq is not None:
            await self._abort_running([seq], "aborted")
            return node_pb2.AbortResponse(found=True)
        if rid in self.arriving or rid not in self.seen:  # it may be on its way: refuse it when it comes
            self.aborted.add(rid)
        return node_pb2.AbortResponse(found=False)

    def _cancel_reservation(self, res: Reservation) -> None:
        self.kv.cancel(res.receiver.transfer_id)
        # the blocks go once the transfer ended: at once where nothing else writes them,
        # else once what the transport posted for them (NCCL's receives) has ended
        self._spawn(self._release_when_ended(res))

    async def _release_when_ended(self, res: Reservation) -> None:
        await res.receiver.status.ended_async()
        await self.call(lambda engine: engine.release(res.blocks))

    async def _abort_running(self, seqs: list, why: str) -> None:
        """Abort sequences already taken out of self.running."""
        self.local.fail(seqs, why)
        for seq in seqs:
            self.outputs.forget(seq)
        await self.call(lambda engine: [engine.abort(seq) for seq in seqs])

    def _drop(self, matches, why: str) -> None:
        """Abort and free every reservation and running request for which matches(epoch, request_id)."""
        res = [r for r in self.reservations.values() if matches(r.epoch, r.request_id)]
        for r in res:
            del self.reservations[r.request_id]
            self.owners.pop(r.request_id, None)
            self._cancel_reservation(r)
        for r in self.admitting.values():
            r.dropped = r.dropped or matches(r.epoch, r.request_id)
        seqs = [s for s in self.running.values() if matches(getattr(s, "epoch", 0), s.request_id)]
        for s in seqs:
            del self.running[s.request_id]
            self.owners.pop(s.request_id, None)
        if seqs:
            self._spawn(self._abort_running(seqs, why))
        if res or seqs:
            log.warning("aborted %d reservations and %d running requests: %s", len(res), len(seqs), why)

    def _on_registered(self, epoch: int) -> None:
        self._drop(lambda e, rid: e != epoch, f"registered anew under epoch {epoch}; the old registration is gone")

    async def OpenKVPairs(self, req: node_pb2.KVPairsRequest, context) -> node_pb2.KVPairsResponse:
        if self.creds.tls or self.creds.secret:  # a secured cluster pairs only with the prefill peers it lists
            wait_s = 3 * max(self.agent.interval, 0.1)
            if await self.listed_peer(req.prefill_node_id, wait_s) is None:
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED,
                               f"prefill node {req.prefill_node_id!r} is not a registered peer of this decode node "
                               f"in its cluster: no KV pairs")
        try:
            host, port = self.kv.accept_pairs(req)
        except ValueError as e:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        return node_pb2.KVPairsResponse(store_host=host, store_port=port, decode_tp=self.cfg.engine.tp)

    async def close(self, grace_s: float = 5.0) -> None:
        self.closing = True
        for task in list(self.tasks):
            task.cancel()
        await super().close(grace_s)

    def gauges(self) -> dict[str, float]:
        arriving = sum(r.receiver.state == TransferState.TRANSFERRING for r in list(self.reservations.values()))
        out = super().gauges()
        out["num_requests_waiting"] += len(self.reservations)
        out.update(num_requests_in_transfer=arriving, num_requests_waiting_reservation_kv=len(self.reservations)
                   - arriving, num_requests_waiting_admission=len(self.admitting))
        return out

    def _load(self) -> node_pb2.HeartbeatRequest:
        load = super()._load()
        load.queued += len(self.reservations)
        return load

