"""The gloo (CPU) path of RankKV: sends and receives as gloo works, whose outcomes a
thread per pair waits for in order (the same code path as NCCL but for the streams)."""
from __future__ import annotations

import queue
import threading

import torch

from . import verify
from .buffers import KVBuffers
from .state import Part


class Waiter:
    """gloo only: its send/recv works report completion only through wait(), so a thread
    per pair waits for them in order and records each outcome ("" ok, else the error).
    It keeps no work once waited: a gloo work left alive in a thread when the process
    exits makes it abort."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"kv-wait-{name}", daemon=True)
        self.thread.start()

    def add(self, work, part: Part) -> None:
        part.status.append(None)
        self._queue.put((work, part, len(part.status) - 1))

    def stop(self) -> None:
        self._queue.put(None)  # after the works queued so far (each ends: done, failed or gloo's timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, part, i = item
            del item
            try:
                work.wait()
                part.status[i] = ""
            except Exception as e:  # noqa: BLE001 - any failure of the work is its outcome
                part.status[i] = f"{type(e).__name__}: {e}"
            del work, part


def send_cpu(bufs: KVBuffers, part: Part, meta: torch.Tensor) -> None:
    """Queue the part's messages, then its tail [key, n_blocks, layers, checksum per layer];
    meta is [block ids..., key, n_blocks, layers]."""
    group, layers, nb = part.pair.group, bufs.kv.num_layers, len(meta) - 3
    idx, tail = meta[:nb], torch.empty(3 + layers, dtype=torch.int64)
    tail[:3] = meta[nb:]
    for l0, l1 in part.groups:
        buf = bufs.gather(idx, l0, l1, part.head, part.heads)
        tail[3 + l0:3 + l1] = verify.checksum(buf)
        part.pair.waiter.add(group.send([buf], 1, 0), part)
    part.tail = tail
    part.pair.waiter.add(group.send([tail], 1, 0), part)


def recv_cpu(bufs: KVBuffers, part: Part, nb: int, layers: int) -> None:
    """Post the part's receives; poll() checks and scatters them once they all arrived."""
    group, waiter = part.pair.group, part.pair.waiter
    part.bufs = bufs.for_part(part.groups, part.heads, nb, part.fused)
    part.tail = torch.empty(3 + layers, dtype=torch.int64)
    for b in [*part.bufs, part.tail]:
        waiter.add(group.recv([b], 0, 0), part)
