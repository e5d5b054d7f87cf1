"""Decode side of the NCCL transport, one per request, into blocks reserved under a
lease. Lifecycle: expect (WAITING) -> announce checked, receives posted on every
decode rank in announce order (TRANSFERRING) -> every rank's layers received,
scattered and checksum-verified, and the first token arrived (DONE) | a check or a
receive failed (FAILED). A posted receive writes into the blocks until it ended, so
a failure or cancel after the announce only ends the transfer (and lets the owner
free the blocks) once its receives ended; a cancel before the announce waits for the
announce (the data is drained), the sender's withdrawal, or the lease's end."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pdserve.kv_transfer.base.conn import KVReceiver
from pdserve.kv_transfer.base.header import check_layout
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.v1 import kv_pb2

from .pairs import PairSet, transfer_key


class NcclKVReceiver(KVReceiver):
    """Decode side, one per request (see the module docstring for when it may end).
    pair_set(name): an open pair set, or None; post(rx, pairs): post its receives on the
    ranks, in announce order; on_end(rx): it ended."""

    def __init__(self, layout: KVLayout, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
                 tp: int, pair_set: Callable[[str], PairSet | None], post: Callable[[NcclKVReceiver, PairSet], None],
                 on_end: Callable[[NcclKVReceiver], None]):
        super().__init__(transfer_id, epoch, block_ids, lease_expiry, tp)
        self.layout, self._pair_set, self._post, self._on_end = layout, pair_set, post, on_end
        self.key = transfer_key(transfer_id)
        self.posted = False       # receives posted on the ranks (or about to be)
        self._data: bool | None = None   # None: in flight; True: verified; False: failed
        self._failure = ""
        self._got_first = False
        self._lock = threading.Lock()

    def accept(self, header: kv_pb2.KVHeader, frames) -> str:
        with self._lock:
            if self.status.ended:
                return self.error or "transfer already complete"
            if header.withdrawn:
                if not self.posted:
                    self._end_failed(self._failure or "withdrawn by the prefill node")
                return ""
            if not header.last:
                ps = self._pair_set(header.pair_set)
                error = ("announced twice" if self.posted else
                         "unexpected data frames" if frames else
                         check_layout(header, self.layout, len(self.block_ids), 0)
                         or ("" if header.num_layers == self.layout.num_layers
                             else f"announce of {header.num_layers} layers")
                         or ("" if ps is not None else f"unknown pair set {header.pair_set!r}"))
                if error:
                    self._end_failed(error)
                    return error
                self.posted = True
                self.status.start()
                self._post(self, ps)
                return ""
            if not self.posted:
                error = "finish before announce"
                self._end_failed(error)
                return error
            self.first_token, self._got_first = header.first_token, True
            self._maybe_end()
            return ""

    def on_data(self, ok: bool, error: str) -> None:
        with self._lock:
            self._data = ok
            if not ok:
                self._failure = self._failure or f"NCCL receive failed: {error}"
            self._maybe_end()

    def cancel(self) -> bool:
        """The request is gone. Before the announce, the sender may still have issued its
        sends (the announce is on its way): stay expected until the announce (its data is
        then received and dropped, so the pair stays in step), the sender's withdrawal or
        the lease's end; the blocks stay reserved until then."""
        with self._lock:
            if self.status.ended:
                return False
            if not self.posted and time.time() < self.lease_expiry:
                self._failure = self._failure or "cancelled"
                return True
        return self.fail("cancelled")

    def fail(self, error: str) -> bool:
        """FAILED now, or once the posted receives ended (they may still write the blocks)."""
        with self._lock:
            if self.status.ended:
                return False
            if self.posted and self._data is None:
                self._failure = self._failure or error
                return True
            return self._end_failed(error)

    def _maybe_end(self) -> None:
        if self._data is None:
            return
        if self._failure:
            self._end_failed(self._failure)
        elif self._got_first:
            self.status.finish()
            self._on_end(self)

    def _end_failed(self, error: str) -> bool:
        ended = self.status.fail(error)
        self._on_end(self)
        return ended
