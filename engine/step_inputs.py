"""A CUDA step's inputs as one buffer, moved to the device with one copy.

The Triton path's per-step arrays (token ids, positions, slots and sample rows in
int64; per sequence the query start, query length and context length, the prefill
kernel's tile list and the block tables in int32) are laid out in one int32 word
array. The host fills a page-locked copy of it with numpy and the device gets it in
one copy; every tensor the forward reads is a view of the device copy.

A layout has capacities: exact ones for an eager step, the largest bucket for the
CUDA graphs of prefill steps (engine/prefill_graphs.py), whose kernels read the table
width and the tile list from the buffer rather than from their launch arguments.

Tiles: the prefill attention kernel runs one program per (tile, head), where a tile is
BLOCK_M query rows of one sequence. Tile i is work[i] = seq << 16 | tile index within
the sequence, or -1 for a padded entry (the program returns at once)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata

BLOCK_M = 64         # query rows per prefill attention tile
SMALL_BLOCK_M = 16   # for steps whose longest query is <= 32 rows (eager only)
MAX_TILES_PER_SEQ = 1 << 16   # a tile entry is seq << 16 | tile, in int32
MAX_SEQS = 1 << 15


def block_m_for(max_query_len: int) -> int:
    return BLOCK_M if max_query_len > 32 else SMALL_BLOCK_M


def tile_work(query_lens: np.ndarray, block_m: int) -> np.ndarray:
    """The tiles of sequences with these query lengths, sequence by sequence: int32
    seq << 16 | tile."""
    q = np.asarray(query_lens, dtype=np.int64)
    tiles = (q + block_m - 1) // block_m
    if q.size > MAX_SEQS or (q.size and int(tiles.max()) > MAX_TILES_PER_SEQ):
        raise ValueError(f"a step of {q.size} sequences, the longest {int(q.max())} new tokens, does not fit the "
                         f"tile list ({MAX_SEQS} sequences, {MAX_TILES_PER_SEQ} tiles of {block_m} rows each)")
    total = int(tiles.sum())
    seq = np.repeat(np.arange(q.size, dtype=np.int64), tiles)
    first = np.repeat(np.cumsum(tiles) - tiles, tiles)
    return ((seq << 16) | (np.arange(total, dtype=np.int64) - first)).astype(np.int32)


def max_tiles(tokens: int, seqs: int, block_m: int = BLOCK_M) -> int:
    """An upper bound on the tiles of any step of at most `tokens` tokens and `seqs` sequences."""
    return -(-tokens // block_m) + seqs


@dataclass(frozen=True)
class Layout:
    """Offsets (int32 words) of each array in the buffer, for these capacities."""
    tokens: int
    seqs: int
    tiles: int
    table: int      # block table entries (sequences x width, packed at the step's width)

    @property
    def wide(self) -> int:  # int64 words: ids, positions, slots, sample rows
        return 3 * self.tokens + self.seqs

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """name -> (start, length) in int32 words (int64 arrays: start and length in int64 words)."""
        t, n = self.tokens, self.seqs
        base = 2 * self.wide
        return {
            "ids": (0, t), "positions": (t, t), "slots": (2 * t, t), "sample": (3 * t, n),
            "width": (base, 1), "query_starts": (base + 1, n), "query_lens": (base + 1 + n, n),
            "context_lens": (base + 1 + 2 * n, n), "work": (base + 1 + 3 * n, self.tiles),
            "table": (base + 1 + 3 * n + self.tiles, self.table),
        }

    @property
    def words(self) -> int:
        start, length = self.offsets["table"]
        return start + length


_WIDE = ("ids", "positions", "slots", "sample")


def views(buf, layout: Layout) -> dict:
    """The arrays of a buffer (a torch int32 tensor or a numpy int32 array) by name."""
    wide = buf[:2 * layout.wide].view(torch.int64 if isinstance(buf, torch.Tensor) else np.int64)
    out = {}
    for name, (start, length) in layout.offsets.items():
        out[name] = (wide if name in _WIDE else buf)[start:start + length]
    return out


def fill(host: dict, layout: Layout, plan, block_m: int, tokens: int | None = None, tiles: int | None = None) -> int:
    """Write a StepPlan into a buffer's numpy views; rows [T, tokens) of the token arrays and
    entries [used, tiles) of the tile list become padding (token 0 at position 0 writing
    nowhere; no work). Returns how many int32 words of the buffer the step uses, from its
    start (the table is packed at the step's width)."""
    n, m = plan.block_tables.shape
    t = plan.input_ids.numel()
    qlens = plan.query_lens.numpy()
    host["ids"][:t] = plan.input_ids.numpy()
    host["positions"][:t] = plan.positions.numpy()
    host["slots"][:t] = plan.slot_mapping.numpy()
    if tokens is not None and tokens > t:
        host["ids"][t:tokens] = 0
        host["positions"][t:tokens] = 0
        host["slots"][t:tokens] = -1
    s = plan.sample_tokens.numel()
    host["sample"][:s] = plan.sample_tokens.numpy()
    host["sample"][s:] = 0
    host["width"][0] = m
    starts = np.cumsum(qlens) - qlens
    host["query_starts"][:n] = starts
    host["query_lens"][:n] = qlens
    host["context_lens"][:n] = plan.context_lens.numpy()
    work = tile_work(qlens, block_m)
    host["work"][:work.size] = work
    if tiles is not None and tiles > work.size:
        host["work"][work.size:tiles] = -1
    host["table"][:n * m] = plan.block_tables.numpy().reshape(-1)
    return layout.offsets["table"][0] + n * m


class Staging:
    """Two page-locked host buffers used in turn, each reused once its last copy to the
    device is done, so that filling one never overwrites what a queued copy still reads.
    Without CUDA (tests): plain memory, and copies are done when they return."""

    def __init__(self, dtype: torch.dtype = torch.int32):
        self.dtype, self.pin = dtype, torch.cuda.is_available()
        self.bufs = [torch.zeros(0, dtype=dtype) for _ in range(2)]
        self.arrays = [b.numpy() for b in self.bufs]  # numpy views: far cheaper to fill piece by piece
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, size: int) -> tuple[int, torch.Tensor, np.ndarray]:
        """A buffer of at least `size` elements that no queued copy still reads: its index, the
        tensor and its numpy view."""
        i, self.turn = self.turn, self.turn ^ 1
        if self.done[i] is not None:
            self.done[i].synchronize()  # the copy of two steps ago has long read it
        if self.bufs[i].numel() < size:
            self.bufs[i] = torch.zeros(max(size, 4096, 2 * self.bufs[i].numel()), dtype=self.dtype,
                                       pin_memory=self.pin)
            self.arrays[i] = self.bufs[i].numpy()
        return i, self.bufs[i], self.arrays[i]

    def copied(self, i: int, device: torch.device) -> None:
        """The copy out of buffer i is queued on the current stream."""
        if device.type != "cuda":
            return
        if self.done[i] is None:
            self.done[i] = torch.cuda.Event()
        self.done[i].record()


class DeviceInputs:
    """Moves StepPlans to the device through Staging, one copy each (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.staging = Staging()

    def load(self, plan, layout: Layout, block_m: int, dst: torch.Tensor | None = None, tokens: int | None = None,
             tiles: int | None = None) -> torch.Tensor:
        """Fill the plan into a staging buffer and queue its copy into dst (by default a new
        device buffer of the layout's size), on the current stream; returns dst."""
        i, host, array = self.staging.take(layout.words)
        used = fill(views(array, layout), layout, plan, block_m, tokens, tiles)
        if dst is None:
            dst = torch.empty(layout.words, dtype=torch.int32, device=self.device)
        dst[:used].copy_(host[:used], non_blocking=True)
        self.staging.copied(i, dst.device)
        return dst

    def eager(self, plan):
        """An eager step's inputs on the device: (ids, positions, attention metadata, sample rows),
        views of one buffer laid out for exactly this plan."""
        n, m = plan.block_tables.shape
        t = plan.input_ids.numel()
        qlens, clens = plan.query_lens.tolist(), plan.context_lens.tolist()
        bm = block_m_for(max(qlens))
        layout = Layout(tokens=t, seqs=n, tiles=max_tiles(t, n, bm), table=n * m)
        d = views(self.load(plan, layout, bm, tiles=layout.tiles), layout)
        meta = AttentionMetadata(
            slot_mapping=d["slots"], block_tables=d["table"].view(n, m), context_lens=d["context_lens"][:n],
            query_lens=qlens, context_lens_host=clens, decode_rows=torch.empty(0), decode_tokens=torch.empty(0),
            prefill_rows=[], triton=True, query_starts=d["query_starts"][:n], query_lens_dev=d["query_lens"][:n],
            max_query_len=max(qlens), tables=d["table"], table_width=d["width"], work=d["work"], block_m=bm)
        return d["ids"], d["positions"], meta, d["sample"][:plan.sample_tokens.numel()]
