"""Test-only faults of the KV path, for the chaos harness and the failure tests. They
exist only in a prefill node started with --kv-fault-hooks (a signal handler is
installed then, nothing otherwise): SIGUSR1 cuts the connection under the next
transfer (its first message leaves, the socket is dropped with what it still queued,
and the transfer's later messages are lost as on a dead TCP link); SIGUSR2 flips one
byte of the next data frame after its checksum was taken. An armed fault that met no
transfer within ARMED_S lapses (a harness arms every prefill node; the idle ones must
not strike later)."""
from __future__ import annotations

import logging
import signal
import threading
import time

ARMED_S = 5.0
log = logging.getLogger(__name__)


class KVFaults:
    def __init__(self):
        self._lock = threading.Lock()
        self._cut = self._corrupt = 0.0  # monotonic time until which each fault is armed
        self.cut_ids: set[str] = set()  # transfers whose later messages are lost (I/O thread only)

    def install(self) -> None:
        """Arm by signal (call from the main thread)."""
        signal.signal(signal.SIGUSR1, lambda *_: self.arm(cut=True))
        signal.signal(signal.SIGUSR2, lambda *_: self.arm(corrupt=True))
        log.warning("KV fault hooks installed: SIGUSR1 cuts a transfer's connection, SIGUSR2 corrupts a frame")

    def arm(self, cut: bool = False, corrupt: bool = False) -> None:
        until = time.monotonic() + ARMED_S
        with self._lock:
            self._cut = until if cut else self._cut
            self._corrupt = until if corrupt else self._corrupt

    def take_cut(self) -> bool:
        with self._lock:
            until, self._cut = self._cut, 0.0
        return until > time.monotonic()

    def take_corrupt(self) -> bool:
        with self._lock:
            until, self._corrupt = self._corrupt, 0.0
        return until > time.monotonic()

    @staticmethod
    def corrupt(frame) -> bytes:
        data = bytearray(frame)
        data[len(data) // 2] ^= 0xFF
        return bytes(data)
