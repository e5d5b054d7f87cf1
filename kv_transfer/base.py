"""Roles of a KV transfer, whatever the transport (SGLang / vLLM-connector style).

Prefill side: a KVManager per node hands out one KVSender per request; the sender
streams groups of layers (send_layers), then finish(first_token), and wait() tells
whether the decode side took it all (DONE) or not (FAILED, with error).

Decode side: the KVManager expects a transfer (expect) for blocks it reserved under
a lease and epoch; the KVReceiver calls write(layer, per_rank) for each verified
layer, already re-sliced to the decode ranks' heads, and ends DONE (first_token
set) or FAILED (bad data, stale epoch, lease expired, cancelled): the owner then
frees or admits the blocks.

States: WAITING -> TRANSFERRING -> DONE | FAILED. FAILED = 0 so that a MIN over
TP ranks makes one failure win."""
from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum, IntEnum

import torch


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class TransferState(IntEnum):
    FAILED = 0
    WAITING = 1
    TRANSFERRING = 2
    DONE = 3


# write(layer, per_rank): per_rank[r] is decode rank r's [2, nblocks, block_size, n_r, head_dim] KV
WriteFn = Callable[[int, list[torch.Tensor]], None]


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


class KVSender(ABC):
    """Prefill side, one per request."""

    def __init__(self, transfer_id: str, epoch: int, num_blocks: int):
        self.transfer_id, self.epoch, self.num_blocks = transfer_id, epoch, num_blocks
        self.status = TransferStatus()

    @abstractmethod
    def send_layers(self, layer_start: int, layers: list[list[torch.Tensor]]) -> None:
        """Queue layers [layer_start, layer_start + len(layers)); layers[i][r] is prefill
        rank r's [2, num_blocks, block_size, n_r, head_dim] shard. Returns at once; the
        tensors must not change until wait() returns."""

    @abstractmethod
    def finish(self, first_token: int) -> None:
        """Queue the last message (all layers must have been sent)."""

    @property
    def state(self) -> TransferState:
        return self.status.state

    @property
    def error(self) -> str:
        return self.status.error

    def wait(self, timeout: float | None) -> TransferState:
        """Block until the receiver acked (DONE), refused (FAILED), or timeout (FAILED)."""
        if self.status.wait(timeout) != TransferState.DONE:
            self.status.fail(f"no ack from the receiver within {timeout} s")
        return self.status.state


class KVReceiver(ABC):
    """Decode side, one per request: created by KVManager.expect."""

    def __init__(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float, tp: int):
        self.transfer_id, self.epoch, self.block_ids = transfer_id, epoch, list(block_ids)
        self.lease_expiry, self.tp = lease_expiry, tp
        self.first_token: int | None = None
        self.status = TransferStatus()

    @property
    def state(self) -> TransferState:
        return self.status.state

    @property
    def error(self) -> str:
        return self.status.error

    def wait(self, timeout: float | None) -> TransferState:
        """Block until DONE or FAILED; the state as it is when the timeout passes otherwise."""
        return self.status.wait(timeout)


class KVManager(ABC):
    """One per node and role; owns the transport's sockets and threads."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Address senders connect to (decode role)."""

    @abstractmethod
    def expect(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
               write: WriteFn) -> KVReceiver:
        """Decode role: register a transfer into reserved blocks, valid until lease_expiry (time.time())."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Decode role: drop an expectation; no write() runs for it once this returns."""

    @abstractmethod
    def sender(self, endpoint: str, transfer_id: str, epoch: int, num_blocks: int) -> KVSender:
        """Prefill role: a sender towards a decode node's endpoint."""
