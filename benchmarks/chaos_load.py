"""Steady load for the chaos harness: greedy requests at a fixed rate on an event loop
of their own (a background thread), each recorded as an Outcome: complete, ended with
a precise gRPC status (which), or lost (no status before its deadline); the stream's
duplicated and skipped token indexes; TTFT and TPOT."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import grpc

from pdserve.wire.rpc import channel
from pdserve.v1 import api_pb2, api_pb2_grpc

# ends a request with a status that says what happened; INTERNAL and UNKNOWN are bugs
PRECISE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED", "FAILED_PRECONDITION", "INVALID_ARGUMENT",
           "NOT_FOUND", "OUT_OF_RANGE"}


@dataclass
class Outcome:
    window: str                  # the fault whose window it was sent in
    prompt: int                  # index into the load's prompts
    expected: int                # max_tokens (ignore_eos: the count a complete request has)
    sent: float                  # monotonic time sent
    ended: float = 0.0
    status: str = "lost"         # "ok", "incomplete", a gRPC code name; "lost": DEADLINE_EXCEEDED (a hang)
    detail: str = ""
    token_ids: list[int] = field(default_factory=list)
    duplicates: int = 0          # tokens whose index was already received
    skips: int = 0               # indexes jumped over
    ttft: float | None = None
    tpot: float | None = None
    retry_after_ms: int | None = None  # a RESOURCE_EXHAUSTED's hint

    @property
    def precise(self) -> bool:
        return self.status in PRECISE


class Load:
    """Requests at `rate` per second over `connections` client connections (so that a
    coordinator with several workers serves them on several), until stop()."""

    def __init__(self, address: str, prompts: list[list[int]], max_tokens: int, rate: float, timeout_s: float,
                 connections: int = 4):
        self.address, self.prompts, self.max_tokens = address, prompts, max_tokens
        self.rate, self.timeout_s, self.connections = rate, timeout_s, connections
        self.outcomes: list[Outcome] = []
        self.window = "warm-up"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sending = threading.Event()
        self._done = threading.Event()
        self._started = threading.Event()
        self._tasks: set[asyncio.Task] = set()
        self._next = 0

    def start(self) -> None:
        self._sending.set()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="chaos-load", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._done.is_set():
            raise RuntimeError("the load's event loop failed to start")

    def stop(self) -> None:
        """Stop sending; wait for every request sent to end (each is bounded by its deadline)."""
        self._sending.clear()
        self._done.wait()
        self._thread.join()

    def burst(self, n: int) -> None:
        """n requests at once, beside the steady rate."""
        self._loop.call_soon_threadsafe(lambda: [self._send() for _ in range(n)])

    async def _main(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
            self._channels = [channel(self.address, max_backoff_s=0.5) for _ in range(self.connections)]
            self._stubs = [api_pb2_grpc.GenerationStub(c) for c in self._channels]
            self._started.set()
            gap, due = 1.0 / self.rate, time.monotonic()
            while self._sending.is_set():
                self._send()
                due += gap
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            for c in self._channels:
                await c.close()
        finally:
            self._started.set()
            self._done.set()

    def _send(self) -> None:
        i = self._next
        self._next += 1
        out = Outcome(self.window, i % len(self.prompts), self.max_tokens, time.monotonic())
        self.outcomes.append(out)
        task = asyncio.ensure_future(self._one(self._stubs[i % len(self._stubs)], out))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, stub, out: Outcome) -> None:
        req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(max_tokens=out.expected, temperature=0.0,
                                                                      ignore_eos=True))
        req.token_ids.ids.extend(self.prompts[out.prompt])
        first = last = None
        finished = False
        call = stub.Generate(req, timeout=self.timeout_s)
        try:
            async for resp in call:
                now = time.monotonic()
                if resp.token_ids:
                    have = len(out.token_ids)
                    if resp.index < have:
                        out.duplicates += min(len(resp.token_ids), have - resp.index)
                    elif resp.index > have:
                        out.skips += resp.index - have
                    keep = resp.token_ids[max(0, have - resp.index):]
                    out.token_ids.extend(keep)
                    first = first or now
                    last = now
                finished = finished or bool(resp.finish_reason)
            n = len(out.token_ids)
            out.status = "ok" if finished and n == out.expected else "incomplete"
            out.detail = "" if out.status == "ok" else f"{n} of {out.expected} tokens, finish={finished}"
        except grpc.aio.AioRpcError as e:
            code = e.code()
            out.status = "lost" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
            out.detail = e.details() or ""
            hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
            out.retry_after_ms = int(hint) if hint else None
        out.ended = time.monotonic()
        if first is not None:
            out.ttft = first - out.sent
            if len(out.token_ids) > 1:
                out.tpot = (last - first) / (len(out.token_ids) - 1)
