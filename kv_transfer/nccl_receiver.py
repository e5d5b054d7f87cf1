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
from typing import TYPE_CHECKING

from pdserve.v1 import kv_pb2

from .base import KVReceiver
from .nccl_pairs import transfer_key
from .header import check_layout

if TYPE_CHECKING:
    from .nccl_transport import NcclKVManager


class NcclKVReceiver(KVReceiver):
    """Decode side, one per request (see the module docstring for when it may end)."""

    def __init__(self, manager: NcclKVManager, transfer_id: str, epoch: int, block_ids: list[int],
                 lease_expiry: float, tp: int):
        super().__init__(transfer_id, epoch, block_ids, lease_expiry, tp)
        self.manager = manager
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
                error = ("announced twice" if self.posted else
                         "unexpected data frames" if frames else
                         check_layout(header, self.manager.layout, len(self.block_ids), 0)
                         or ("" if header.num_layers == self.manager.layout.num_layers
                             else f"announce of {header.num_layers} layers")
                         or ("" if header.pair_set in self.manager.pair_sets else
                             f"unknown pair set {header.pair_set!r}"))
                if error:
                    self._end_failed(error)
                    return error
                self.posted = True
                self.status.start()
                self.manager.post_recv(self, self.manager.pair_sets[header.pair_set])
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
            self.manager.retire(self)

    def _end_failed(self, error: str) -> bool:
        ended = self.status.fail(error)
        self.manager.retire(self)
        return ended
