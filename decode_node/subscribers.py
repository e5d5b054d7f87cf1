"""A decode node's token streams: one Subscriber per Subscribe call, fed one TokenBatch
per engine step. A subscriber that stops reading (a frozen coordinator) is cut off once
`limit` batches wait for it (NodeConfig.max_unread_batches), rather than growing its
queue without end. A request reserved for a subscriber id (a coordinator worker) goes
only to the streams of that id (DecodeNode._publish)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pdserve.v1 import node_pb2


@dataclass(eq=False)
class Subscriber:
    epoch: int                                    # the registration whose requests it streams
    limit: int                                    # unread batches before it is cut off
    id: str = ""                                  # the subscriber id ("": a stream of every request)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cut: asyncio.Event = field(default_factory=asyncio.Event)   # set: too far behind

    def put(self, batch: node_pb2.TokenBatch) -> bool:
        """Queue a batch; False (and cut off) if `limit` already wait."""
        if self.queue.qsize() >= self.limit:
            self.cut.set()
            return False
        self.queue.put_nowait(batch)
        return True

    async def stream(self, context) -> None:
        """Write queued batches to the call until cut off. A write blocked by a client
        that does not read is raced against the cut, so the call still ends."""
        await context.write(node_pb2.TokenBatch())  # tells the subscriber the stream is live
        cut = asyncio.ensure_future(self.cut.wait())
        step = None
        try:
            while True:
                step = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({step, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return
                step = asyncio.ensure_future(context.write(step.result()))
                await asyncio.wait({step, cut}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.add_done_callback(_retrieve)  # ends with the call; never cancelled mid-write
                    step = None
                    return
                step.result()
        finally:
            cut.cancel()
            if step is not None and not step.done():
                step.cancel()


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
