"""The decode side of the control channel (the ZeroMQ transport's data too): one ROUTER
socket and the thread that owns it.

Each message is parsed, its protocol version and compat hash checked first, then
dispatched by transfer_id to the expected KVReceiver (the epoch must match, the
lease must be live). The sender gets one KVAck per transfer: on the last message
(ok) or on the first error. An ended transfer leaves a short-lived tombstone so that
later messages for it are answered once, then dropped. Expired leases are swept on
every poll and their receivers FAILED ("lease expired") so the owner frees blocks."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq
from google.protobuf.message import DecodeError

from pdserve.v1 import kv_pb2

from .conn import KVReceiver
from .header import Buffer, check_compat
from .layout import KVLayout
from .status import TransferState

log = logging.getLogger(__name__)

TOMBSTONE_TTL_S = 60.0
MAX_TOMBSTONES = 4096
BURST = 64  # messages read per poll before the next sweep


@dataclass
class Ended:
    reason: str
    acked: bool
    until: float


class KVInbox:
    def __init__(self, layout: KVLayout, router: zmq.Socket, poll_ms: int):
        self.layout, self.poll_ms = layout, poll_ms
        self._router = router  # bound; owned by the thread from start() on
        self._lock = threading.Lock()
        self._expected: dict[str, KVReceiver] = {}
        self._ended: OrderedDict[str, Ended] = OrderedDict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pdserve-kv-recv", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Join the thread (it closes the socket), fail what is still expected."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            live, self._expected = list(self._expected.values()), {}
            self._ended.clear()
        for rx in live:
            rx.fail("KV manager closed")

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._expected)

    def expect(self, rx: KVReceiver) -> None:
        with self._lock:
            if rx.transfer_id in self._expected:
                raise ValueError(f"transfer {rx.transfer_id} is already expected")
            self._ended.pop(rx.transfer_id, None)
            self._expected[rx.transfer_id] = rx

    def expected(self, transfer_id: str) -> KVReceiver | None:
        """The live receiver of a transfer, or None."""
        with self._lock:
            return self._expected.get(transfer_id)

    def retire(self, rx: KVReceiver) -> None:
        """Forget a receiver that ended outside a message (a transport whose data ends elsewhere)."""
        self._retire(rx, acked=rx.state == TransferState.DONE)

    def cancel(self, transfer_id: str) -> bool:
        with self._lock:
            rx = self._expected.get(transfer_id)
        if rx is None or not rx.fail("cancelled"):  # fail() waits out a write in progress
            return False
        self._retire(rx, acked=False)
        return True

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self._router.poll(self.poll_ms):
                    self._receive_burst()
                self._sweep()
        finally:
            self._router.close(linger=0)

    def _receive_burst(self) -> None:
        for _ in range(BURST):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) < 2:
                continue
            try:
                ack = self._dispatch(parts[1].bytes, [p.buffer for p in parts[2:]])
            except Exception as e:  # a bug must not stop the receive thread
                log.exception("KV message dropped")
                ack = kv_pb2.KVAck(ok=False, error=f"internal error: {type(e).__name__}: {e}")
            if ack is not None:
                self._router.send_multipart([parts[0], ack.SerializeToString()])

    def _dispatch(self, header_bytes: bytes, frames: list[Buffer]) -> kv_pb2.KVAck | None:
        """Check and route one message; the ack to send back, if any."""
        try:
            header = kv_pb2.KVHeader.FromString(header_bytes)
        except DecodeError:
            return kv_pb2.KVAck(ok=False, error="bad header: not a KVHeader")
        error = check_compat(header, self.layout)
        tid = header.transfer_id
        if error:
            return kv_pb2.KVAck(transfer_id=tid, ok=False, error=error)
        with self._lock:
            rx = self._expected.get(tid)
            if rx is None:
                return self._answer_ended(tid)
        if header.epoch != rx.epoch:  # a stale sender: refused once, the expectation stays
            return self._refuse_stale(tid, header.epoch, rx.epoch)
        error = rx.accept(header, frames)
        if error or rx.state == TransferState.DONE:
            self._retire(rx, acked=True)
            return kv_pb2.KVAck(transfer_id=tid, ok=not error, error=error)
        return None

    def _refuse_stale(self, tid: str, epoch: int, current: int) -> kv_pb2.KVAck | None:
        key = f"{tid}@{epoch}"  # acks carry no epoch: one answer per stale sender
        with self._lock:
            if key in self._ended:
                return None
            reason = f"stale epoch {epoch}, expected {current}"
            self._remember(key, Ended(reason, True, time.time() + TOMBSTONE_TTL_S))
        return kv_pb2.KVAck(transfer_id=tid, ok=False, error=reason)

    def _answer_ended(self, tid: str) -> kv_pb2.KVAck | None:
        """(lock held) A message for no live expectation: answered once per transfer id."""
        ended = self._ended.get(tid)
        if ended is None:
            reason = f"unknown transfer {tid!r}"
            self._remember(tid, Ended(reason, True, time.time() + TOMBSTONE_TTL_S))
            return kv_pb2.KVAck(transfer_id=tid, ok=False, error=reason)
        if ended.acked:
            return None
        ended.acked = True
        return kv_pb2.KVAck(transfer_id=tid, ok=False, error=ended.reason)

    def _retire(self, rx: KVReceiver, acked: bool) -> None:
        with self._lock:
            if self._expected.get(rx.transfer_id) is rx:
                del self._expected[rx.transfer_id]
            reason = rx.error or "transfer already complete"
            self._remember(rx.transfer_id, Ended(reason, acked, time.time() + TOMBSTONE_TTL_S))

    def _remember(self, tid: str, ended: Ended) -> None:
        self._ended.pop(tid, None)
        self._ended[tid] = ended
        while len(self._ended) > MAX_TOMBSTONES:
            self._ended.popitem(last=False)

    def _sweep(self) -> None:
        now = time.time()
        with self._lock:
            expired = [rx for rx in self._expected.values() if rx.lease_expiry <= now]
            while self._ended and next(iter(self._ended.values())).until <= now:
                self._ended.popitem(last=False)
        for rx in expired:
            rx.fail("lease expired")
            self._retire(rx, acked=False)
