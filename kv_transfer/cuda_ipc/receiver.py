"""Decode side of the cuda-ipc transport, one per request, into blocks reserved under a
lease. Lifecycle: expect (WAITING) -> announce checked (epoch by the inbox; layout, pair
set, lease, not cancelled here) and granted (TRANSFERRING): from now on the prefill node
may write the blocks, so the lease no longer ends it -> finish with the first token
(DONE) | withdrawal, or the prefill node's pair set dropped (FAILED). A refusal before
the grant means nothing was or will be written. A cancel or failure after the grant is
remembered and ends the transfer at the finish or withdrawal, so blocks are never
freed while a copy may still land in them."""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pdserve.kv_transfer.base.conn import KVReceiver
from pdserve.kv_transfer.base.header import check_layout
from pdserve.kv_transfer.base.inbox import KVInbox
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.v1 import kv_pb2


class IpcKVReceiver(KVReceiver):
    granted = False

    @property
    def lease_expiry(self) -> float:
        """The lease holds the blocks until the grant; then the grant does (renewals change nothing)."""
        return math.inf if self.granted else self._lease

    @lease_expiry.setter
    def lease_expiry(self, value: float) -> None:
        self._lease = value

    def __init__(self, layout: KVLayout, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
                 tp: int, known_pair_set: Callable[[str], bool], on_end: Callable[[IpcKVReceiver], None]):
        super().__init__(transfer_id, epoch, block_ids, lease_expiry, tp)
        self.layout, self._known, self._on_end = layout, known_pair_set, on_end
        self.pair_set = ""
        self._grant_unsent = False
        self._failure = ""
        self._lock = threading.Lock()

    def accept(self, header: kv_pb2.KVHeader, frames) -> str:
        with self._lock:
            if self.status.ended:
                return self.error or "transfer already complete"
            if header.withdrawn:
                self._end_failed(self._failure or "withdrawn by the prefill node")
                return ""
            if not header.last:
                error = ("announced twice" if self.granted else
                         "KV data frames came, but this decode node's transport is cuda-ipc: give both "
                         "nodes the same --kv-transport" if frames else
                         check_layout(header, self.layout, len(self.block_ids), 0)
                         or ("" if header.num_layers == self.layout.num_layers
                             else f"announce of {header.num_layers} layers")
                         or ("" if self._known(header.pair_set) else f"unknown pair set {header.pair_set!r}")
                         or ("lease expired" if time.time() >= self.lease_expiry else "")
                         or self._failure)
                if error:
                    self._end_failed(error)
                    return error
                self.granted, self.pair_set, self._grant_unsent = True, header.pair_set, True
                self.status.start()
                return ""
            if not self.granted:
                error = "finish before announce"
                self._end_failed(error)
                return error
            if self._failure:
                self._end_failed(self._failure)
                return ""
            self.first_token = header.first_token
            self.status.finish()
            self._on_end(self)
            return ""

    def take_grant(self) -> bool:
        """(inbox thread) True once, after the announce was granted: answer it."""
        with self._lock:
            grant, self._grant_unsent = self._grant_unsent, False
            return grant

    def cancel(self) -> bool:
        return self.fail("cancelled")

    def fail(self, error: str) -> bool:
        """FAILED now, or, once granted, at the finish or withdrawal (copies may still land)."""
        with self._lock:
            if self.status.ended:
                return False
            if self.granted:
                self._failure = self._failure or error
                return True
            return self._end_failed(error)

    def peer_gone(self, why: str) -> None:
        """The prefill node that holds the grant is gone: nothing can write the blocks any more."""
        with self._lock:
            if not self.status.ended:
                self._end_failed(why)

    def _end_failed(self, error: str) -> bool:
        ended = self.status.fail(error)
        self._on_end(self)
        return ended


class IpcInbox(KVInbox):
    """The control channel's decode side, answering a granted announce at once."""

    def _dispatch(self, ident: bytes, header_bytes: bytes, frames) -> kv_pb2.KVAck | None:
        ack = super()._dispatch(ident, header_bytes, frames)  # no writer threads here: answered now
        if ack is None:
            tid = kv_pb2.KVHeader.FromString(header_bytes).transfer_id
            rx = self.expected(tid)
            if isinstance(rx, IpcKVReceiver) and rx.take_grant():
                return kv_pb2.KVAck(transfer_id=tid, ok=True, granted=True)
        return ack

    def receivers(self) -> list[IpcKVReceiver]:
        with self._lock:
            return [rx for rx in self._expected.values() if isinstance(rx, IpcKVReceiver)]
