"""Admission control: a bounded number of requests per coordinator process, served
max_inflight at a time, the slots handed out round-robin over clients.

A request is admitted (served or waiting for a slot) while fewer than max_inflight +
max_queued are; beyond that it gets RESOURCE_EXHAUSTED with a retry hint in the
trailing metadata (`retry-after-ms`: how long the waiting requests take to drain at
the recent completion rate). When full, a newcomer from a client that waits for fewer
slots than the heaviest waiting client takes that client's newest waiting place
(which ends RESOURCE_EXHAUSTED): one client flooding the queue cannot lock the others
out, and a freed slot goes to the next client in turn, not to the flood's next request."""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque

import grpc

from pdserve.wire.rpc import RpcError

RETRY_AFTER_KEY = "retry-after-ms"
MIN_RETRY_MS, MAX_RETRY_MS = 100, 30_000


class Admission:
    def __init__(self, max_inflight: int, max_queued: int):
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.inflight = 0
        self.waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()  # client -> its waiters, in turn
        self.waiting_count = 0
        self._done_times: deque[float] = deque(maxlen=64)  # when recent requests released their slots

    @property
    def admitted(self) -> int:
        return self.inflight + self.waiting_count

    def retry_after_ms(self) -> int:
        """How long the queue ahead takes to drain at the recent completion rate."""
        done = self._done_times
        if len(done) < 2 or done[-1] <= done[0]:
            return 1000
        rate = (len(done) - 1) / (done[-1] - done[0])
        return int(min(MAX_RETRY_MS, max(MIN_RETRY_MS, 1000 * (self.waiting_count + 1) / rate)))

    def refusal(self, why: str) -> RpcError:
        ms = self.retry_after_ms()
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{why}; retry after {ms} ms",
                        trailers=((RETRY_AFTER_KEY, str(ms)),))

    async def acquire(self, client: str) -> None:
        """Take a slot for one request of `client`, waiting in its turn; RpcError
        RESOURCE_EXHAUSTED when the coordinator is full (or this place was taken)."""
        if self.inflight < self.max_inflight and not self.waiting_count:
            self.inflight += 1
            return
        if self.admitted >= self.max_inflight + self.max_queued and not self._evict_for(client):
            raise self.refusal(f"{self.admitted} requests in flight or queued (limit {self.max_inflight} + "
                               f"{self.max_queued})")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(client, deque()).append(fut)
        self.waiting_count += 1
        try:
            await fut  # the slot is ours once set (release counted it for us)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # granted just as we were cancelled: pass it on
            else:
                self._forget(client, fut)
            raise

    def release(self) -> None:
        """A request left its slot: the next client in turn gets it."""
        self._done_times.append(time.monotonic())
        while self.waiting:
            client, queue = next(iter(self.waiting.items()))
            fut = queue.popleft()
            self.waiting_count -= 1
            if queue:
                self.waiting.move_to_end(client)  # round robin: this client goes to the back
            else:
                del self.waiting[client]
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1

    def _evict_for(self, client: str) -> bool:
        """Take the newest waiting place of the client waiting for the most slots, if it waits
        for more than `client` would with this request."""
        if not self.waiting:
            return False
        heavy = max(self.waiting, key=lambda c: len(self.waiting[c]))
        if heavy == client or len(self.waiting[heavy]) <= len(self.waiting.get(client, ())) + 1:
            return False
        fut = self.waiting[heavy].pop()
        self.waiting_count -= 1
        if not self.waiting[heavy]:
            del self.waiting[heavy]
        fut.set_exception(self.refusal("the queue is full and this client holds the most of it"))
        return True

    def _forget(self, client: str, fut: asyncio.Future) -> None:
        queue = self.waiting.get(client)
        if queue is not None and fut in queue:
            queue.remove(fut)
            self.waiting_count -= 1
            if not queue:
                del self.waiting[client]
