"""The decode side of the control channel (the ZeroMQ transport's data too): one ROUTER
socket and the thread that owns it.

Each message is parsed, its protocol version and compat hash checked first, then
dispatched by transfer_id to the expected KVReceiver (the epoch must match, the
lease must be live). The sender gets one KVAck per transfer: on the last message
(ok) or on the first error. An ended transfer leaves a short-lived tombstone so that
later messages for it are answered once, then dropped. Expired leases are swept on
every poll and their receivers FAILED ("lease expired") so the owner frees blocks.

With writers > 0 the receive thread only parses and routes: each message's frame
checks and writes run on one of `writers` threads, a transfer's messages always on the
same one and in order, so many transfers' copies (which release the GIL) overlap the
next receives; the writers hand their acks back through an inproc wake-up socket."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import zlib
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
SWEEP_S = 0.02  # how often expired leases and tombstones are swept


@dataclass
class Ended:
    reason: str
    acked: bool
    until: float


_inboxes = itertools.count()


class KVInbox:
    def __init__(self, layout: KVLayout, router: zmq.Socket, poll_ms: int, writers: int = 0):
        self.layout, self.poll_ms = layout, poll_ms
        self._router = router  # bound; owned by the thread from start() on
        self._lock = threading.Lock()
        self._expected: dict[str, KVReceiver] = {}
        self._ended: OrderedDict[str, Ended] = OrderedDict()
        self._stop = threading.Event()
        self._next_sweep = 0.0
        self._thread = threading.Thread(target=self._serve, name="pdserve-kv-recv", daemon=True)
        self._jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(writers)]
        self._writers = [threading.Thread(target=self._write_loop, args=(q,), name=f"pdserve-kv-write-{i}",
                                          daemon=True) for i, q in enumerate(self._jobs)]
        self._acks: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._wake_addr = f"inproc://pdserve-kv-acks-{next(_inboxes)}"
        self._wake: zmq.Socket | None = None
        if writers:
            self._wake = router.context.socket(zmq.PULL)
            self._wake.bind(self._wake_addr)

    def start(self) -> None:
        for t in self._writers:
            t.start()
        self._thread.start()

    def close(self) -> None:
        """Join the threads (the receive thread closes the sockets), fail what is still expected."""
        self._stop.set()
        for q in self._jobs:
            q.put(None)
        for t in self._writers:
            t.join()
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
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        if self._wake is not None:
            poller.register(self._wake, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self.poll_ms))
                if self._router in events:
                    self._receive_burst()
                if self._wake is not None and self._wake in events:
                    self._send_acks()
                self._sweep()
        finally:
            self._router.close(linger=0)
            if self._wake is not None:
                self._wake.close(linger=0)

    def _send_acks(self) -> None:
        while True:
            try:
                self._wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                ident, ack = self._acks.get_nowait()
            except queue.Empty:
                return
            self._router.send_multipart([ident, ack])

    def _write_loop(self, jobs: queue.SimpleQueue) -> None:
        """A writer thread: check and write the messages routed to it, hand back the acks."""
        wake = self._router.context.socket(zmq.PUSH)
        wake.connect(self._wake_addr)
        try:
            while (job := jobs.get()) is not None:
                ident, rx, header, frames = job
                try:
                    ack = self._accept(rx, header, frames)
                except Exception as e:  # a bug must not stop the writer
                    log.exception("KV message dropped")
                    ack = kv_pb2.KVAck(transfer_id=rx.transfer_id, ok=False,
                                       error=f"internal error: {type(e).__name__}: {e}")
                if ack is not None:
                    self._acks.put((ident, ack.SerializeToString()))
                    try:
                        wake.send(b"", zmq.NOBLOCK)
                    except zmq.Again:  # wake-ups already pending
                        pass
        finally:
            wake.close(linger=0)

    def _receive_burst(self) -> None:
        for _ in range(BURST):
            try:
                parts = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) < 2:
                continue
            try:
                ack = self._dispatch(parts[0].bytes, parts[1].bytes, [p.buffer for p in parts[2:]])
            except Exception as e:  # a bug must not stop the receive thread
                log.exception("KV message dropped")
                ack = kv_pb2.KVAck(ok=False, error=f"internal error: {type(e).__name__}: {e}")
            if ack is not None:
                self._router.send_multipart([parts[0], ack.SerializeToString()])

    def _dispatch(self, ident: bytes, header_bytes: bytes, frames: list[Buffer]) -> kv_pb2.KVAck | None:
        """Check and route one message; the ack to send back now, if any (a writer thread
        answers for the messages routed to it)."""
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
        if self._jobs:
            self._jobs[zlib.crc32(tid.encode()) % len(self._jobs)].put((ident, rx, header, frames))
            return None
        return self._accept(rx, header, frames)

    def _accept(self, rx: KVReceiver, header: kv_pb2.KVHeader, frames: list[Buffer]) -> kv_pb2.KVAck | None:
        """Check and write one message into its receiver; the ack, if one is due."""
        tid = header.transfer_id
        with self._lock:  # retired while the message was queued (failed, cancelled, expired): answered once
            if rx.status.ended and self._expected.get(tid) is not rx and tid in self._ended:
                return self._answer_ended(tid)
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
        """At most every SWEEP_S: the scan is over every live expectation."""
        now = time.time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_S
        with self._lock:
            expired = [rx for rx in self._expected.values() if rx.lease_expiry <= now]
            while self._ended and next(iter(self._ended.values())).until <= now:
                self._ended.popitem(last=False)
        for rx in expired:
            rx.fail("lease expired")
            self._retire(rx, acked=False)
