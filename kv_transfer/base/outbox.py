"""The prefill side of the control channel (the ZeroMQ transport's data too): one I/O
thread owning one DEALER socket per decode endpoint (made on first use) and an inproc wake-up socket. Senders queue
messages; the thread checksums and sends them (copy=False, never blocking) and
routes each KVAck back to its sender by transfer_id. Once an endpoint where a
transfer failed unanswered (timeout, send error) has no live sender, its socket is
closed, dropping whatever it still queued: a dead peer does not pin the shards, nor
keep a socket reconnecting forever."""
from __future__ import annotations

import logging
import queue
import threading

import zmq
from google.protobuf.message import DecodeError

from pdserve.v1 import kv_pb2

from .conn import KVSender, Outgoing
from .faults import KVFaults
from .curve import CurveKeys

log = logging.getLogger(__name__)

WAKE_ADDR = "inproc://pdserve-kv-wake"


class KVOutbox:
    def __init__(self, ctx: zmq.Context, poll_ms: int, faults: KVFaults | None = None,
                 curve: CurveKeys | None = None):
        """faults: test-only fault hooks (None: none). curve: connect as a CURVE client with
        these keys, to the server key set_server_key() gave."""
        self._ctx, self.poll_ms, self.faults, self.curve = ctx, poll_ms, faults, curve
        self._server_keys: dict[str, bytes] = {}  # endpoint -> its CURVE public key (under _lock)
        self._dealer_keys: dict[str, bytes] = {}  # endpoint -> the key its open socket was made with
        self._lock = threading.Lock()
        self._senders: dict[tuple[str, str], KVSender] = {}  # (endpoint, transfer_id) -> sender
        self._queue: queue.SimpleQueue[tuple[KVSender, Outgoing]] = queue.SimpleQueue()
        self._pull = ctx.socket(zmq.PULL)  # the thread's end of the wake-up pair
        self._pull.bind(WAKE_ADDR)
        self._push: zmq.Socket | None = ctx.socket(zmq.PUSH)  # callers' end, used under _lock
        self._push.connect(WAKE_ADDR)
        self._dealers: dict[str, zmq.Socket] = {}
        self._open: set[str] = set()  # the keys of _dealers, readable by other threads under _lock
        self._failed: set[str] = set()  # endpoints to reset once idle
        self._poller = zmq.Poller()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="pdserve-kv-send", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Join the thread (it closes its sockets, dropping queued messages), fail live senders."""
        self._stop.set()
        self._wake()
        self._thread.join()
        with self._lock:
            live, self._senders = list(self._senders.values()), {}
            if self._push is not None:
                self._push.close(linger=0)
                self._push = None
        for tx in live:
            tx.fail("KV manager closed")

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._senders)

    @property
    def endpoints(self) -> list[str]:
        """Endpoints with an open socket."""
        with self._lock:
            return sorted(self._open)

    def set_server_key(self, endpoint: str, key: bytes) -> None:
        """The CURVE public key of the decode node at endpoint (from its ticket); a new key
        (the node restarted on the address) replaces the socket at the next send."""
        with self._lock:
            self._server_keys[endpoint] = key

    def add(self, tx: KVSender) -> None:
        key = (tx.endpoint, tx.transfer_id)
        with self._lock:
            if key in self._senders and not self._senders[key].status.ended:  # acks carry only the id
                raise ValueError(f"transfer {tx.transfer_id} to {tx.endpoint} is already being sent")
            self._senders[key] = tx

    def submit(self, tx: KVSender, out: Outgoing) -> None:
        self._queue.put((tx, out))
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._push is not None:
                try:
                    self._push.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # wake-ups already pending
                    pass

    def _pump(self) -> None:
        self._poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(self._poller.poll(self.poll_ms))
                try:
                    while self._pull.poll(0):
                        self._pull.recv()
                    self._send_queued()
                    for ep, sock in self._dealers.items():
                        if sock in events:
                            self._read_acks(ep, sock)
                    self._prune()
                except Exception:  # a bug must not stop the I/O thread; senders still time out
                    log.exception("KV send loop")
        finally:
            for sock in [self._pull, *self._dealers.values()]:
                sock.close(linger=0)
            self._dealers.clear()
            with self._lock:
                self._open.clear()

    def _send_queued(self) -> None:
        while True:
            try:
                tx, out = self._queue.get_nowait()
            except queue.Empty:
                return
            if tx.status.ended:
                continue
            try:
                message = tx.build_message(out)
                if self.faults is not None and not self._inject(tx, out, message):
                    continue
                self._dealer(tx.endpoint).send_multipart(message, zmq.NOBLOCK, copy=False)
            except Exception as e:  # a socket error fails this transfer only
                tx.fail(f"send to {tx.endpoint} failed: {type(e).__name__}: {e}")
            if self.faults is not None and tx.transfer_id in self.faults.cut_ids:
                self._drop(tx.endpoint)  # the link dies under the message just sent

    def _inject(self, tx: KVSender, out: Outgoing, message: list) -> bool:
        """Test-only faults (faults.py); False: the message is lost."""
        faults = self.faults
        if tx.transfer_id in faults.cut_ids:
            return False
        if out.num_layers and len(message) > 1 and faults.take_corrupt():
            log.warning("fault hook: corrupting a frame of transfer %s", tx.transfer_id)
            message[1] = faults.corrupt(message[1])
        if not out.last and faults.take_cut():
            log.warning("fault hook: cutting the connection under transfer %s", tx.transfer_id)
            faults.cut_ids.add(tx.transfer_id)
        return True

    def _drop(self, endpoint: str) -> None:
        """Close an endpoint's socket with what it still queued (the next send reconnects)."""
        sock = self._dealers.pop(endpoint, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)
            with self._lock:
                self._open.discard(endpoint)

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._dealers.get(endpoint)
        key = None
        if self.curve is not None:
            with self._lock:
                key = self._server_keys.get(endpoint)
            if key is None:
                raise ConnectionRefusedError(f"no CURVE key known for {endpoint}")
            if sock is not None and self._dealer_keys.get(endpoint) != key:
                self._close_dealer(endpoint)
                sock = None
        if sock is None:
            sock = self._dealers[endpoint] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # bounded by live senders; a failed endpoint is reset
            if key is not None:
                self.curve.connect_to(sock, key)
                self._dealer_keys[endpoint] = key
            sock.connect(endpoint)
            self._poller.register(sock, zmq.POLLIN)
            with self._lock:
                self._open.add(endpoint)
        return sock

    def _read_acks(self, endpoint: str, sock: zmq.Socket) -> None:
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ack = kv_pb2.KVAck.FromString(data)
            except DecodeError:
                continue
            with self._lock:
                tx = self._senders.get((endpoint, ack.transfer_id))
            if tx is not None:
                tx.on_ack(ack)

    def _prune(self) -> None:
        """Forget ended senders; close an endpoint's socket once idle after an unanswered failure."""
        with self._lock:
            for key, tx in list(self._senders.items()):
                if tx.status.ended:
                    del self._senders[key]
                    tx.release()
                    if tx.peer_suspect:
                        self._failed.add(tx.endpoint)
            busy = {ep for ep, _ in self._senders}
        for ep in [ep for ep in self._failed if ep not in busy]:
            self._failed.discard(ep)
            self._close_dealer(ep)

    def _close_dealer(self, ep: str) -> None:
        sock = self._dealers.pop(ep, None)
        self._dealer_keys.pop(ep, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)
            with self._lock:
                self._open.discard(ep)
