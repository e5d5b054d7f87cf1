"""Test-only faults of the KV path, for the chaos harness and the failure tests. They
exist only in a prefill node started with --kv-fault-hooks (a signal handler is
installed then, nothing otherwise): SIGUSR1 cuts the connection under the next
transfer (its first message leaves, the socket is dropped with what it still queued,
and the transfer's later messages are lost as on a dead TCP link); SIGUSR2 flips one
byte of the next data frame after its checksum was taken."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class KVFaults:
    def __init__(self):
        self._lock = threading.Lock()
        self._cut = self._corrupt = False
        self.cut_ids: set[str] = set()  # transfers whose later messages are lost (I/O thread only)

    def install(self) -> None:
        """Arm by signal (call from the main thread)."""
        signal.signal(signal.SIGUSR1, lambda *_: self.arm(cut=True))
        signal.signal(signal.SIGUSR2, lambda *_: self.arm(corrupt=True))
        log.warning("KV fault hooks installed: SIGUSR1 cuts a transfer's connection, SIGUSR2 corrupts a frame")

    def arm(self, cut: bool = False, corrupt: bool = False) -> None:
        with self._lock:
            self._cut |= cut
            self._corrupt |= corrupt

    def take_cut(self) -> bool:
        with self._lock:
            armed, self._cut = self._cut, False
        return armed

    def take_corrupt(self) -> bool:
        with self._lock:
            armed, self._corrupt = self._corrupt, False
        return armed

    @staticmethod
    def corrupt(frame) -> bytes:
        data = bytearray(frame)
        data[len(data) // 2] ^= 0xFF
        return bytes(data)
