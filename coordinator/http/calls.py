"""One HTTP request's choices, each a coordinator request run through the same path as
gRPC Generate (Coordinator.generate) in a task of its own. Their responses merge into
one sequence of (choice, response); a choice's last item is END or the error it ended
with. A client that disconnects, or any choice that fails, cancels them all: each
request's finally block then aborts its work on the nodes and frees its KV.

A choice hands on one response at a time (a queue of one), so a client that reads
slowly holds its request's write the way a slow gRPC client does: tokens coalesce on
the coordinator, and --client-stall-timeout / --max-pending-tokens end it."""
from __future__ import annotations

import asyncio
import contextlib

import grpc

from pdserve.wire.rpc import EXPECTED, RpcError
from pdserve.v1 import api_pb2

END = object()
_running: set[asyncio.Task] = set()  # strong references until each task is done


class Call:
    """One choice; also the `context` Coordinator.generate takes (time_remaining, abort, peer,
    send_initial_metadata)."""

    def __init__(self, coordinator, index: int, req: api_pb2.GenerateRequest, open_ended: bool, peer: str):
        self.index, self._peer = index, peer
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        self.ended: RpcError | None = None  # the lifecycle ended the request (abort)
        self.dropped = False                # the HTTP side cancelled it (Choices.cancel)
        self.task = asyncio.create_task(self._run(coordinator, req, open_ended))
        _running.add(self.task)
        self.task.add_done_callback(_running.discard)

    def time_remaining(self) -> float | None:
        return None  # HTTP clients set no deadline; a client that leaves cancels

    def peer(self) -> str:
        return self._peer  # the client's connection: admission's fairness unit, as a gRPC peer is

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.ended = RpcError(code, message)

    async def send_initial_metadata(self, metadata) -> None:
        """Nothing to send ahead: the HTTP response starts with its first chunk."""

    async def _run(self, coordinator, req: api_pb2.GenerateRequest, open_ended: bool) -> None:
        try:
            async with contextlib.aclosing(coordinator.generate(req, self, open_ended)) as responses:
                async for resp in responses:
                    await self.queue.put(resp)
            last = END
        except asyncio.CancelledError:
            if self.dropped:  # cancelled by the HTTP side: nobody waits for an answer
                raise
            # the lifecycle cut the request (Lifecycle.cut): its abort() may not have run yet
            last = self.ended or RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "request ended: its client lagged")
        except EXPECTED as e:
            last = e
        except Exception as e:  # noqa: BLE001 (a bug: the client still gets an answer)
            last = RpcError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        await self.queue.put(last)


class Choices:
    """The choices of one HTTP request; `receive` is the ASGI channel, watched for a disconnect."""

    def __init__(self, coordinator, reqs: list[api_pb2.GenerateRequest], open_ended: bool, receive, peer: str):
        self.calls = [Call(coordinator, i, r, open_ended, peer) for i, r in enumerate(reqs)]
        self.gone = asyncio.ensure_future(_disconnect(receive))
        self.disconnected = False

    async def items(self):
        """(choice index, response | END | exception) until every choice ended; stops early
        (disconnected set) when the client goes away."""
        gets = {asyncio.ensure_future(c.queue.get()): c for c in self.calls}
        try:
            while gets:
                done, _ = await asyncio.wait({*gets, self.gone}, return_when=asyncio.FIRST_COMPLETED)
                if self.gone in done:
                    self.disconnected = True
                    return
                for f in done:
                    call = gets.pop(f)
                    item = f.result()
                    if not (item is END or isinstance(item, BaseException)):
                        gets[asyncio.ensure_future(call.queue.get())] = call
                    yield call.index, item
        finally:
            for f in gets:
                f.cancel()

    def cancel(self) -> None:
        """Stop every choice still running (the request's end, a failure or a disconnect)."""
        self.gone.cancel()
        for c in self.calls:
            c.dropped = True
            c.task.cancel()


async def _disconnect(receive) -> None:
    """Returns once the client has disconnected (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass
