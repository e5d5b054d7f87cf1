"""How the coordinator runs one request over the pools, and what it does when a node
fails under it:

    reserve decode blocks (queue while every decode node is full)
      -> prefill (its KV goes to the reservation) -> first token to the client
      -> relay the decode node's tokens -> finish

Before the first token, a lost node (stream broken, heartbeats missed, RPC
unreachable) or a failed transfer is retried: the reservation is released and made
again, on another prefill node where one exists. After it, a lost decode node moves
the request to another one (migration). The lease of a reservation is renewed while
its request waits; only the client's deadline ends a request for time. Whatever a
request leaves behind on a node is aborted when it ends."""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.coordinator import metrics
from pdserve.coordinator.registry import NodeEntry, Registry
from pdserve.coordinator.request import RequestRecord
from pdserve.coordinator.routing import Router
from pdserve.coordinator.tokens import deliver
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2

log = logging.getLogger("pdserve.coordinator")

# a prefill attempt that failed with one of these may succeed elsewhere or later
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.DEADLINE_EXCEEDED}


# a Reserve that ended so may or may not hold blocks on the node
UNKNOWN_OUTCOME = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                   grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


class Retry(Exception):
    """The prefill phase failed in a way another attempt may not. avoid_decode: the
    failure was the decode node's KV path; the next attempts go to other decode nodes."""

    def __init__(self, message: str, avoid_decode: bool = False, decode_silent: bool = False):
        """decode_silent: the decode node never answered the transfer (a timeout): it is not
        tried again for this request, and without another decode node the request fails now."""
        super().__init__(message)
        self.avoid_decode, self.decode_silent = avoid_decode or decode_silent, decode_silent


class Lifecycle:
    def __init__(self, cfg, registry: Registry, spawn):
        self.cfg, self.registry, self.spawn = cfg, registry, spawn
        self.router = Router(cfg.routing)
        self.requests: dict[str, RequestRecord] = {}
        self._capacity = asyncio.Event()
        self.subscriber = ""   # a worker's id: nodes stream its requests' tokens to its own Subscribe only
        self.on_lost = None    # a worker's hook: tell the supervisor, which fences the node for every worker

    def freed(self) -> None:
        """Decode capacity may have come back: wake the requests queued for it."""
        self._capacity.set()
        self._capacity = asyncio.Event()

    def node_lost(self, node: NodeEntry, why: str, tell: bool = True) -> None:
        """Fence a node off; wake every request that depends on it. tell: pass it on to on_lost
        (False where the news came from the supervisor)."""
        if node.down:
            return
        node.down, node.streaming = True, False
        log.warning("node %s (%s) %s", node.id, api_pb2.Role.Name(node.role), why)
        if tell and self.on_lost is not None:
            self.on_lost(node, why)
        for record in list(self.requests.values()):
            if record.decode is node:
                record.decode_lost()
            if record.prefill is node:
                record.alarm.set()

    async def run(self, record: RequestRecord):
        """The client's responses, first token to last."""
        first = await self.start(record)
        resp = record.first_response(first)
        metrics.first_token(record)
        yield resp
        if first.finish_reason:  # the first token ended it: the decode reservation is not needed
            record.finish()
            metrics.finished(record, first.finish_reason)
            await self.abort(record.decode, record.key)
            yield record.last_response(first.finish_reason)
            return
        while True:
            resp, finish, lost = await record.relay()  # what arrived while the last write was blocked, at once
            if resp is not None:
                metrics.tokens(record, len(resp.token_ids))
                yield resp
            if not finish and lost:
                first = await self.migrate(record)
                resp = record.continued_response(first)
                metrics.tokens(record, 1)
                yield resp
                finish = first.finish_reason
                if finish:
                    await self.abort(record.decode, record.key)
            if finish:
                record.finish()
                metrics.finished(record, finish)
                yield record.last_response(finish)
                return

    async def start(self, record: RequestRecord) -> node_pb2.PrefillResponse:
        """Reserve and prefill, again from the reservation while attempts fail."""
        failed: set[str] = set()  # prefill nodes that failed this request: others first
        avoid: set[str] = set()   # decode nodes whose KV path failed this request: others first
        shun: set[str] = set()    # decode nodes that never answered a transfer of it: never again
        last = None
        while True:
            try:
                await self.reserve(record, avoid, shun)
            except RpcError as e:
                if last is not None:  # say why the request needed another reservation
                    e.message = f"{e.message}; an earlier attempt failed: {last}"
                raise
            try:
                return await self.prefill(record, failed)
            except Retry as e:
                record.retries += 1
                metrics.retried(e.avoid_decode)
                if e.avoid_decode:
                    avoid.add(record.decode.id)
                if e.decode_silent:  # a stalled node: more pairings or sends to it only pile up
                    shun.add(record.decode.id)
                self.unreserve(record)
                last = e
                if e.decode_silent and not self.registry.candidates(api_pb2.ROLE_DECODE, exclude=shun):
                    raise RpcError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
                if record.retries > self.cfg.max_retries:
                    raise RpcError(grpc.StatusCode.UNAVAILABLE,
                                   f"gave up after {record.retries} attempts; the last: {e}") from None
                log.info("request %s tries again (%d): %s", record.id, record.retries, e)

    async def migrate(self, record: RequestRecord) -> node_pb2.PrefillResponse:
        """The decode node died mid-stream: prefill the prompt and the tokens sent so far
        again, for another decode node, which continues from the next output index (greedy
        requests continue exactly; seeded sampling does not replay its draws)."""
        gone = record.decode
        if record.migrations >= self.cfg.max_migrations:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"decode node {gone.id} is gone")
        gone.inflight -= 1
        self.spawn(self.abort(gone, record.key))  # a frozen node frees it when it wakes
        record.migrate()
        metrics.migrated()
        log.info("request %s moves off decode node %s after %d tokens", record.id, gone.id, record.offset)
        return await self.start(record)

    def unreserve(self, record: RequestRecord) -> None:
        node = record.decode
        if node is not None:
            node.inflight -= 1
            self.spawn(self.abort(node, record.key))
        record.unreserve()
        self.freed()

    async def reserve(self, record: RequestRecord, avoid: set[str] = frozenset(),
                      shun: set[str] = frozenset()) -> None:
        """Blocks on the least loaded decode node; while all are full, wait for capacity."""
        while True:
            full = False
            # decode nodes whose KV path failed this request come last, not never: a transient
            # fault (a cut link, a corrupted frame) on every node must not end the request early
            nodes = self.registry.candidates(api_pb2.ROLE_DECODE, exclude=avoid | shun)
            nodes = nodes or self.registry.candidates(api_pb2.ROLE_DECODE, exclude=shun)
            for node in self.router.order(nodes, record, api_pb2.ROLE_DECODE):
                record.reserving.add(node)  # a cancel from here on aborts there too
                try:
                    ticket = await node.stub.Reserve(node_pb2.ReserveRequest(
                        request_id=record.key, prompt_token_ids=record.run_prompt, sampling=record.run_sampling,
                        lease_s=self.cfg.lease_s, epoch=node.epoch, subscriber=self.subscriber),
                        timeout=_bounded(record, 10.0))
                except grpc.aio.AioRpcError as e:
                    record.reserving.discard(node)
                    if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                        raise RpcError(e.code(), e.details()) from None
                    if e.code() in UNKNOWN_OUTCOME:  # it may have reserved just before the end
                        self.spawn(self.abort(node, record.key))
                        record.next_attempt()  # and the next Reserve must not meet that abort
                    full = full or e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    continue
                record.reserving.discard(node)
                record.reserved(node, ticket)
                node.inflight += 1
                return
            if not full:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "no decode node could take the request")
            capacity = self._capacity
            try:  # queued: until a request ends somewhere, or a heartbeat later
                await asyncio.wait_for(capacity.wait(), self.registry.interval)
            except asyncio.TimeoutError:
                pass

    async def prefill(self, record: RequestRecord, failed: set[str]) -> node_pb2.PrefillResponse:
        colocated = record.decode.role == api_pb2.ROLE_BOTH or record.ticket.local_prefill
        if colocated:
            node = record.decode
        else:
            nodes = (self.registry.candidates(api_pb2.ROLE_PREFILL, exclude=failed)
                     or self.registry.candidates(api_pb2.ROLE_PREFILL))
            if not nodes:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, "no prefill node is available")
            node = self.router.order(nodes, record, api_pb2.ROLE_PREFILL)[0]
        record.prefilling(node)
        work = len(record.run_prompt) - self.router.matched_tokens(node, record)
        node.inflight += 1
        node.inflight_tokens += work
        try:
            call = node.prefill_stub.Prefill(node_pb2.PrefillRequest(
                request_id=record.key, prompt_token_ids=record.run_prompt, sampling=record.run_sampling,
                ticket=record.ticket, keep_kv=colocated, subscriber=self.subscriber if colocated else ""),
                timeout=record.remaining())
            resp = await self._unless_alarmed(record, call)
            record.prefilled(resp)
            return resp
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            out_of_time = record.remaining() is not None and record.remaining() <= 0
            if code not in RETRYABLE or out_of_time:
                raise RpcError(code, f"prefill failed: {details}") from None
            transfer = "KV transfer" in details
            if code == grpc.StatusCode.UNAVAILABLE and not transfer:
                self.node_lost(node, f"is unreachable: {details}")
            failed.add(node.id)
            silent = transfer and ("timed out" in details or "no ack" in details)
            raise Retry(f"prefill on {node.id}: {code.name}: {details}", avoid_decode=transfer,
                        decode_silent=silent) from None
        finally:
            node.inflight -= 1
            node.inflight_tokens -= work
            record.prefill = None

    async def _unless_alarmed(self, record: RequestRecord, call):
        """Await a node call; Retry when a node of the request is lost first."""
        answer = asyncio.ensure_future(call)
        alarm = asyncio.ensure_future(record.alarm.wait())
        try:
            await asyncio.wait({answer, alarm}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            alarm.cancel()
            if not answer.done():
                call.cancel()
                answer.cancel()
        if answer.cancelled() or not answer.done():
            raise Retry("a node of the request was lost")
        return answer.result()

    async def release(self, record: RequestRecord) -> None:
        """After the request ended: stop any work still running for it on the nodes."""
        if record.decode is not None:
            record.decode.inflight -= 1
        nodes = set(record.reserving)
        if record.state != "FINISHED":
            nodes |= {record.decode, record.prefill}
        await asyncio.gather(*(self.abort(n, record.key) for n in nodes if n is not None))
        self.freed()

    async def abort(self, node: NodeEntry | None, key: str) -> None:
        """Stop an attempt (RequestRecord.key) on a node, whatever it holds there."""
        if node is None or self.registry.nodes.get(node.id) is not node:
            return
        try:
            await node.stub.Abort(node_pb2.AbortRequest(request_id=key), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            log.debug("abort of %s on %s failed: %s", key, node.id, e.code().name)

    def renew_due(self) -> None:
        """Renew the leases of reservations still waiting for their KV, per decode node."""
        due: dict[str, tuple[NodeEntry, list[RequestRecord]]] = {}
        horizon = time.time() + self.cfg.lease_s * 2 / 3  # called every lease / 3
        for r in self.requests.values():
            node = r.decode
            if (r.ticket is not None and r.state in ("RESERVED", "PREFILLING") and node.role != api_pb2.ROLE_BOTH
                    and not r.ticket.local_prefill and r.ticket.lease_expiry < horizon and not node.down):
                due.setdefault(node.id, (node, []))[1].append(r)
        for node, records in due.values():
            self.spawn(self._renew(node, records))

    async def _renew(self, node: NodeEntry, records: list[RequestRecord]) -> None:
        try:
            resp = await node.stub.Renew(node_pb2.RenewRequest(
                epoch=node.epoch, request_ids=[r.key for r in records], lease_s=self.cfg.lease_s),
                timeout=max(1.0, self.registry.timeout))
        except grpc.aio.AioRpcError as e:
            log.warning("lease renewal on %s failed: %s", node.id, e.code().name)
            return
        missing = set(resp.missing)
        for r in records:
            if r.decode is node and r.ticket is not None and r.key not in missing:
                r.ticket.lease_expiry = resp.lease_expiry

    def deliver(self, batch, node: NodeEntry) -> None:
        """A decode node's step batch to its requests; a request whose client lags by more
        than max_pending_tokens is ended."""
        for record in deliver(batch, node, self.requests, self.cfg.max_pending_tokens):
            self.cut(record, f"its client fell more than {self.cfg.max_pending_tokens} tokens behind "
                             f"(--max-pending-tokens)")

    def cut_stalled(self) -> None:
        """A client that stopped reading: its stream is ended and its work freed, rather
        than generating to max_tokens into a buffer nobody drains."""
        now = time.monotonic()
        for r in list(self.requests.values()):
            if r.writing_since is not None and now - r.writing_since > self.cfg.client_stall_s:
                self.cut(r, f"its client read nothing for {now - r.writing_since:.0f} s (--client-stall-timeout)")

    def cut(self, record: RequestRecord, why: str) -> None:
        """End the request of a client that does not keep up: RESOURCE_EXHAUSTED (the client
        sees it once it reads again), and its task cancelled, so what it holds is freed now."""
        if record.cut or record.task is None:
            return
        log.warning("request %s: %s; ending it", record.id, why)
        record.cut, record.writing_since = True, None
        record.fail(grpc.StatusCode.RESOURCE_EXHAUSTED)
        if record.context is not None:  # queued behind the blocked write: not awaited
            self.spawn(_abort_call(record.context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"request ended: {why}"))
        record.task.cancel()


async def _abort_call(context, code: grpc.StatusCode, message: str) -> None:
    try:
        await context.abort(code, message)
    except Exception:  # AbortError once sent; or the call already ended
        pass


def _bounded(record: RequestRecord, limit: float) -> float:
    left = record.remaining()
    return limit if left is None else max(0.001, min(limit, left))
