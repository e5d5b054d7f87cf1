"""Diagnostics of GPU KV transfers (benchmarks --diag): a timeline of host calls and CUDA events."""
from __future__ import annotations

import time

import torch


class Trace:
    """Diagnostics (benchmarks/kv_nccl.py --diag): the steps of GPU transfers, each as a
    host time (time.perf_counter: CLOCK_MONOTONIC, one clock for every process of the
    host) or a CUDA event, converted to that clock by report(). Set RankKV.trace to one;
    it adds an event per step, so it is never on in serving."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[tuple[str, float | None, torch.cuda.Event | None]] = []

    def host(self, label: str) -> None:
        self.marks.append((label, time.perf_counter(), None))

    def gpu(self, label: str, stream: torch.cuda.Stream) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.marks.append((label, None, event))

    def report(self) -> list[tuple[str, float]]:
        """(label, host seconds) of every mark so far, in the order made; clears them. A GPU
        mark's time is a reference event's host time (recorded on an idle stream, spun on
        until it completed: within a few microseconds) minus its GPU time before it."""
        torch.cuda.synchronize(self.device)
        ref = torch.cuda.Event(enable_timing=True)
        ref.record(torch.cuda.Stream(self.device))
        while not ref.query():
            pass
        now = time.perf_counter()
        out = [(label, t if event is None else now - event.elapsed_time(ref) / 1e3) for label, t, event in self.marks]
        self.marks.clear()
        return out

