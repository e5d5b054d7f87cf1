"""The state of one KV transfer, shared between the thread that moves it and its owner.

States: WAITING -> TRANSFERRING -> DONE | FAILED. FAILED = 0 so that a MIN over
TP ranks makes one failure win."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from enum import IntEnum


class TransferState(IntEnum):
    FAILED = 0
    WAITING = 1
    TRANSFERRING = 2
    DONE = 3


class TransferStatus:
    """State and error of one transfer, shared between the I/O thread and its owner."""

    def __init__(self):
        self._cond = threading.Condition()
        self.state = TransferState.WAITING
        self.error = ""
        self._callbacks: list[Callable[[], None]] = []

    @property
    def ended(self) -> bool:
        return self.state in (TransferState.DONE, TransferState.FAILED)

    def start(self) -> None:
        with self._cond:
            if self.state == TransferState.WAITING:
                self.state = TransferState.TRANSFERRING

    def finish(self) -> bool:
        return self._end(TransferState.DONE, "")

    def fail(self, error: str) -> bool:
        """Move to FAILED unless already ended; True if this call ended it."""
        return self._end(TransferState.FAILED, error)

    def wait(self, timeout: float | None) -> TransferState:
        with self._cond:
            self._cond.wait_for(lambda: self.ended, timeout)
            return self.state

    def on_end(self, fn: Callable[[], None]) -> None:
        """Call fn() once the transfer ended (now, if it has), on the thread that ends it."""
        with self._cond:
            if not self.ended:
                self._callbacks.append(fn)
                return
        fn()

    async def ended_async(self, timeout: float | None = None) -> bool:
        """Await the end without polling; False if timeout (seconds) passed first."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.on_end(lambda: loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None)))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _end(self, state: TransferState, error: str) -> bool:
        with self._cond:
            if self.ended:
                return False
            self.state, self.error = state, error
            self._cond.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()
        return True
