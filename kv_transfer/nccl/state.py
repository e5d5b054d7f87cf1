"""The state RankKV keeps: a pair (one 2-rank communicator and its streams), a pair's
share of a transfer (a part: its heads, messages and their outcome), and a transfer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import lib as nccl_lib


@dataclass(eq=False)
class Pair:
    name: str
    index: int                        # 0 sends (prefill), 1 receives (decode)
    group: Any                        # CPU: ProcessGroupGloo
    stream: torch.cuda.Stream | None  # GPU: the pair's gather/scatter stream
    waiter: Any                       # CPU: its rank_cpu.Waiter
    closed: str = ""                  # why it was closed; "" while open
    comm: nccl_lib.Comm | None = None      # GPU: the pair's NCCL communicator
    wire: torch.cuda.Stream | None = None  # GPU: its sends or receives, in order
    rows: torch.Tensor | None = None  # GPU, fused: the row sums, reused by every transfer (stream order)
    marks: list[torch.cuda.Event] = field(default_factory=list)  # GPU: per message, reused (see mark())

    def row_sums(self, layers: int, nb: int, device: torch.device) -> torch.Tensor:
        """[layers, 2 * nb] int64 for the fused kernels' row sums: one buffer per pair, grown
        when needed, used only on the pair's stream (one transfer after another)."""
        if self.rows is None or self.rows.numel() < layers * 2 * nb:
            # made on the pair's stream, whatever stream is current: memory the caching
            # allocator hands out on the compute stream can still be in use by queued layers
            # (a streamed send is prepared before its forward runs), and the old buffer,
            # freed here, goes back to the pair's stream, behind its last reader
            with torch.cuda.stream(self.stream):
                self.rows = torch.empty(max(layers * 2 * nb, 1 << 16), dtype=torch.int64, device=device)
        return self.rows[:layers * 2 * nb].view(layers, 2 * nb)

    def mark(self, i: int, on: torch.cuda.Stream) -> torch.cuda.Event:
        """The pair's i-th event, recorded on `on` now. The events are reused by every
        transfer: a wait takes an event's last record at the time the wait is queued, so
        recording it again later cannot change an earlier wait."""
        while len(self.marks) <= i:
            self.marks.append(torch.cuda.Event())
        self.marks[i].record(on)
        return self.marks[i]


@dataclass(eq=False)
class Part:
    """One pair's share of a transfer: its heads, messages and their state."""
    pair: Pair
    head: int                                  # first local head on this rank
    heads: int
    groups: list[tuple[int, int]]
    fused: bool = False                        # its messages move through the fused kernels
    bufs: list[torch.Tensor] = field(default_factory=list)
    status: list[str | None] = field(default_factory=list)  # CPU: per work, set by the waiter
    tail: torch.Tensor | None = None
    host: torch.Tensor | None = None           # GPU recv: pinned copy of [tail..., local checksums...]
    event: torch.cuda.Event | None = None      # GPU: send: after the tail left; recv: after the scatter and the copy to host
    error: str = ""
    settled: bool = False
    streaming: bool = False                    # GPU send: some of its messages wait for layers still to be queued


@dataclass(eq=False)
class Transfer:
    key: int
    sending: bool
    block_ids: list[int]
    num_layers: int
    started: float
    parts: list[Part] = field(default_factory=list)
    error: str = ""
