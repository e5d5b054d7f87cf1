"""FakeKVManager: the KV of a transfer moves by a direct call inside one process.

Decode role: expect() registers a receiver under this manager's endpoint (fake://N);
a sweep thread fails receivers whose lease ended. Prefill role: complete() on a
sender exports the prompt's KV, re-slices it to the decode ranks' heads, writes it
through the receiver's write(), and ends both DONE at once, or FAILED (no such
endpoint or transfer, stale epoch) without writing."""
from __future__ import annotations

import itertools
import threading
import time

from pdserve.kv_transfer.base.conn import ExportFn, KVManager, KVReceiver, KVSender, Role, WriteFn
from pdserve.kv_transfer.base.layout import KVLayout, assemble_heads
from pdserve.v1 import node_pb2

_ids = itertools.count(1)
_managers: dict[str, FakeKVManager] = {}   # decode managers of this process, by endpoint
_lock = threading.Lock()


class FakeKVReceiver(KVReceiver):
    def __init__(self, layout: KVLayout, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
                 tp: int, write: WriteFn):
        super().__init__(transfer_id, epoch, block_ids, lease_expiry, tp)
        self.layout, self.write = layout, write

    def accept(self, header, frames) -> str:
        return "the fake transport has no messages"

    def take(self, layers, first_token: int, epoch: int, prefill_tp: int) -> str:
        """Write [layer][prefill rank] shards re-sliced to this node's ranks; the reason if refused."""
        if epoch != self.epoch:
            return f"stale epoch {epoch}, expected {self.epoch}"
        if time.time() >= self.lease_expiry:
            return "lease expired"
        self.status.start()
        sent = [self.layout.heads(r, prefill_tp) for r in range(prefill_tp)]
        try:
            for layer, shards in enumerate(layers):
                held = [(start, t) for (start, _), t in zip(sent, shards)]
                self.write(layer, [assemble_heads(held, *self.layout.heads(r, self.tp)) for r in range(self.tp)])
        except Exception as e:  # the owner's write failed: the transfer cannot complete
            error = f"write failed: {type(e).__name__}: {e}"
            self.fail(error)
            return error
        self.first_token = first_token
        self.status.finish()
        return ""


class FakeKVSender(KVSender):
    def __init__(self, layout: KVLayout, tp: int, endpoint: str, transfer_id: str, epoch: int, num_blocks: int):
        super().__init__(transfer_id, epoch, num_blocks, endpoint)
        self.layout, self.tp = layout, tp

    def complete(self, first_token: int, export: ExportFn) -> None:
        if self.status.ended:
            return
        with _lock:
            decode = _managers.get(self.endpoint)
        rx = decode.pop(self.transfer_id) if decode is not None else None
        if rx is None:
            self.fail(f"unknown transfer {self.transfer_id!r} at {self.endpoint}")
            return
        self.status.start()
        error = rx.take(export(0, self.layout.num_layers), first_token, self.epoch, self.tp)
        if error:
            rx.fail(error)
            self.fail(f"refused by the receiver: {error}")
        else:
            self.status.finish()

    def build_message(self, out) -> list:
        raise RuntimeError("the fake transport sends no messages")


class FakeKVManager(KVManager):
    name = "fake"

    def __init__(self, role: Role, layout: KVLayout, tp: int = 1):
        self.role, self.layout, self.tp = Role(role), layout, tp
        self._endpoint = f"fake://{next(_ids)}" if self.role == Role.DECODE else ""
        self._expected: dict[str, FakeKVReceiver] = {}
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="pdserve-kv-fake", daemon=True)

    def start(self) -> None:
        if self.role == Role.DECODE:
            with _lock:
                _managers[self._endpoint] = self
            self._sweeper.start()

    def close(self) -> None:
        with _lock:
            _managers.pop(self._endpoint, None)
        self._stop.set()
        if self._sweeper.is_alive():
            self._sweeper.join()
        with _lock:
            live, self._expected = list(self._expected.values()), {}
        for rx in live:
            rx.fail("KV manager closed")

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def pending(self) -> int:
        return len(self._expected)

    async def sender_for(self, ticket: node_pb2.Ticket, num_blocks: int) -> FakeKVSender:
        return FakeKVSender(self.layout, self.tp, ticket.kv_endpoint, ticket.transfer_id, ticket.epoch, num_blocks)

    def expect(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
               write: WriteFn) -> FakeKVReceiver:
        rx = FakeKVReceiver(self.layout, transfer_id, epoch, block_ids, lease_expiry, self.tp, write)
        with _lock:
            if transfer_id in self._expected:
                raise ValueError(f"transfer {transfer_id} is already expected")
            self._expected[transfer_id] = rx
        return rx

    def pop(self, transfer_id: str) -> FakeKVReceiver | None:
        with _lock:
            return self._expected.pop(transfer_id, None)

    def cancel(self, transfer_id: str) -> bool:
        rx = self.pop(transfer_id)
        return rx is not None and rx.fail("cancelled")

    def _sweep(self) -> None:
        while not self._stop.wait(0.05):
            now = time.time()
            with _lock:
                expired = [rx for rx in self._expected.values() if rx.lease_expiry <= now]
                for rx in expired:
                    del self._expected[rx.transfer_id]
            for rx in expired:
                rx.fail("lease expired")
