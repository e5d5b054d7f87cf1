"""Fused gather/scatter kernels of the NCCL KV data mover (Triton, GPU).

A message of RankKV holds layers [l0, l1) of heads [head, head + heads) of a transfer's
blocks as [layers, 2 (k, v), n_blocks, block_size, heads, head_dim]. One launch per
message moves it between the paged cache and the contiguous buffer and, in the same
pass over the bytes, checksums it: per block row (a layer's k or v of one block), the
row's int32 words summed mod 2**32, times (its index in the layer + 1), written to
rows[layer, index]; rows.sum(1) is then the per-layer checksum of verify.checksum,
bit for bit. Against torch's index_select/index_copy_ plus a separate checksum (about
ten launches and two reads of the buffer per message), this is one launch and one read,
which is what lets the messages be small enough to stream the KV layer by layer.

Rows whose width is not a multiple of 4 bytes are not handled here (supported() says
which); RankKV then keeps its torch path."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["l0", "nb", "head", "total", "rounds"])
def _move_rows(k_ptr, v_ptr, idx_ptr, buf_ptr, rows_ptr, l0, nb, layer_stride, block_stride, tok_stride, head, total,
               rounds, WPH: tl.constexpr, SEG: tl.constexpr, SEGP: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr,
               SCATTER: tl.constexpr):
    """The message's block rows (layers x 2 x nb of them, `total`), each program taking
    rows pid, pid + programs, ... in `rounds` rounds. All sizes and strides are in int32 words: WPH per head,
    SEG = heads x WPH per token (SEGP: the next power of two), BS tokens per block, TB
    tokens per tile. l0, nb, head, total and rounds are not specialized on (one compiled kernel
    serves every request); the head offset is head x WPH so that its alignment stays known."""
    per_layer = 2 * nb
    t = tl.arange(0, TB)[:, None]
    w = tl.arange(0, SEGP)[None, :]
    i = 0
    while i < rounds:  # not range(): Triton's interpreter cannot loop to a runtime bound that way
        first = tl.program_id(0) + i * tl.num_programs(0)
        i += 1
        live = (t * 0 + first) < total  # [TB, 1], not a scalar: Triton 3.9's interpreter refuses scalar masks
        pid = tl.minimum(first, total - 1)  # past the end: reads the last row again, writes nothing
        lg = pid // per_layer
        r = pid % per_layer          # index in the layer: kv * nb + j
        kv = r // nb
        blk = tl.load(idx_ptr + r % nb).to(tl.int64)
        base = (l0 + lg).to(tl.int64) * layer_stride + blk * block_stride + head * WPH
        row = pid.to(tl.int64) * (BS * SEG)
        acc = tl.zeros([TB, SEGP], dtype=tl.int64)
        for t0 in range(0, BS, TB):
            mask = (t0 + t < BS) & (w < SEG) & live
            cache = base + (t0 + t) * tok_stride + w
            flat = row + (t0 + t) * SEG + w
            if SCATTER:
                x = tl.load(buf_ptr + flat, mask=mask, other=0)
                if kv == 0:
                    tl.store(k_ptr + cache, x, mask=mask)
                else:
                    tl.store(v_ptr + cache, x, mask=mask)
            else:
                if kv == 0:
                    x = tl.load(k_ptr + cache, mask=mask, other=0)
                else:
                    x = tl.load(v_ptr + cache, mask=mask, other=0)
                tl.store(buf_ptr + flat, x, mask=mask)
            acc += x.to(tl.int64)
        s = tl.sum(tl.sum(acc, axis=1), axis=0)
        s32 = ((s + 2147483648) & 4294967295) - 2147483648  # the int32 sum's wrap-around, sign-extended
        if first < total:
            tl.store(rows_ptr + (l0 + lg).to(tl.int64) * per_layer + r, s32 * (r + 1).to(tl.int64))


def supported(k: torch.Tensor, head: int, heads: int) -> bool:
    """Whether these kernels can move heads [head, head + heads) of this cache: every offset
    and length is whole int32 words, and the cache is a contiguous GPU (or, interpreted,
    CPU) tensor."""
    es, hd, kvh = k.element_size(), k.shape[-1], k.shape[-2]
    return k.is_contiguous() and all(n * hd * es % 4 == 0 for n in (head, heads, kvh))


class Mover:
    """The kernels bound to one cache (k, v: [layers, num_blocks, block_size, kv_heads,
    head_dim]): its int32 views and strides are worked out once, so that a launch costs
    the host little more than Triton's own dispatch (a message's host time is on the
    transfer's critical path whenever the KV is already computed). programs caps the
    grid (0: one program per block row): a gather running beside a NCCL send takes
    memory bandwidth from it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, programs: int = 0):
        self.k, self.v, self.programs = k, v, programs
        self.k32, self.v32 = (t.view(-1).view(torch.int32) for t in (k, v))
        self.k_ptr, self.v_ptr = self.k32.data_ptr(), self.v32.data_ptr()
        es = k.element_size()
        self.es, self.bs, self.hd = es, k.shape[2], k.shape[4]
        self.strides = tuple(n * es // 4 for n in k.stride()[:3])
        self._shapes: dict[int, tuple[int, int, int, int]] = {}
        # (heads, scatter) -> the compiled kernel, launched directly: Triton's dispatch (binding
        # and specializing the arguments, looking the kernel up) costs the host tens of
        # microseconds per launch, on the transfer's critical path
        self._compiled: dict[tuple[int, bool], Any] = {}
        self.direct = k.is_cuda  # False: always through Triton's dispatch (the interpreter, tests)

    def launch(self, idx: int, buf: int, rows: int, l0: int, l1: int, head: int, heads: int, scatter: bool, nb: int,
               stream: int) -> bool:
        """move() by raw addresses (idx, buf, rows) on a raw CUDA stream handle, with none of
        torch's calls: only where move() already compiled this (heads, scatter) variant and
        the addresses are 16-byte aligned as it was compiled for. False: nothing launched,
        call move()."""
        compiled = self._compiled.get((heads, scatter))
        if compiled is None or (idx | buf | rows) % 16:
            return False
        wph, seg, segp, tb = self._shapes[heads]
        if wph * 4 != self.hd * self.es:
            wph, head = 1, head * self.hd * self.es // 4
        total = (l1 - l0) * 2 * nb
        programs = min(total, self.programs) if self.programs > 0 else total
        compiled[(programs, 1, 1)](self.k_ptr, self.v_ptr, idx, buf, rows, l0, nb, *self.strides, head, total,
                                   -(-total // programs), wph, seg, segp, self.bs, tb, scatter, stream=stream)
        return True

    def move(self, idx: torch.Tensor, l0: int, l1: int, head: int, heads: int, buf: torch.Tensor,
             rows: torch.Tensor, scatter: bool, nb: int | None = None, stream: torch.cuda.Stream | None = None) -> None:
        """Gather (scatter=False) layers [l0, l1), heads [head, head + heads) of the blocks in
        idx (its first nb entries; all of it by default) into buf (int32: the words of
        [l1 - l0, 2, nb, block_size, heads, head_dim] in the cache's dtype), or scatter buf
        back; either way write the rows' weighted sums into rows [num_layers, 2 * nb]
        (int64) at layers [l0, l1). idx may be page-locked host memory, which the kernel
        then reads in place (no copy to the device first). Runs on `stream` (default: the
        current one)."""
        shape = self._shapes.get(heads)
        if shape is None:
            wph, seg = self.hd * self.es // 4, heads * self.hd * self.es // 4
            segp = triton.next_power_of_2(seg)
            shape = self._shapes[heads] = (wph, seg, segp, max(1, min(triton.next_power_of_2(self.bs), 4096 // segp)))
        nb = len(idx) if nb is None else nb
        ptrs = idx.data_ptr(), buf.data_ptr(), rows.data_ptr()
        if (heads, scatter) in self._compiled:
            handle = (stream or torch.cuda.current_stream(self.k.device)).cuda_stream
            if self.launch(*ptrs, l0, l1, head, heads, scatter, nb, handle):
                return
        wph, seg, segp, tb = shape
        if wph * 4 != self.hd * self.es:  # a head is not whole words (heads and offsets are): the offset in words
            wph, head = 1, head * self.hd * self.es // 4
        total = (l1 - l0) * 2 * nb
        programs = min(total, self.programs) if self.programs > 0 else total
        rounds = -(-total // programs)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if idx.device != self.k.device:  # Triton's dispatch wants device tensors (a copy on the kernel's stream)
                idx = idx.to(self.k.device, non_blocking=True)
            kernel = _move_rows[(programs,)](self.k32, self.v32, idx, buf, rows, l0, nb, *self.strides, head, total,
                                             rounds, WPH=wph, SEG=seg, SEGP=segp, BS=self.bs, TB=tb, SCATTER=scatter,
                                             num_warps=4)
        if self.direct and hasattr(kernel, "function") and not (idx.data_ptr() | ptrs[1] | ptrs[2]) % 16:
            self._compiled[(heads, scatter)] = kernel


def move(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, l0: int, l1: int, head: int, heads: int,
         buf: torch.Tensor, rows: torch.Tensor, scatter: bool, programs: int = 0) -> None:
    """Mover(k, v, programs).move for one call, buf shaped [l1 - l0, 2, len(idx),
    block_size, heads, head_dim] in the cache's dtype (tests and benchmarks)."""
    Mover(k, v, programs).move(idx, l0, l1, head, heads, buf.view(-1).view(torch.int32), rows, scatter)


def preload(k: torch.Tensor, heads_counts: list[int]) -> None:
    """Compile and load the kernels a cache shaped like k will use, for each count of heads
    moved, gathering and scattering (see rank.py: a kernel first loaded while a NCCL
    receive spins can hold the host until that receive's data comes). Runs on scratch
    tensors whose strides specialize the kernel as k's do; writes nothing of k."""
    nb_like = k.shape[1] % 16 or 16  # same residue mod 16 as k's block count: the same layer stride class
    scratch = [torch.zeros((1, nb_like, *k.shape[2:]), dtype=k.dtype, device=k.device) for _ in range(2)]
    idx = torch.zeros(1, dtype=torch.long, device=k.device)
    rows = torch.zeros((1, 2), dtype=torch.int64, device=k.device)
    for heads in heads_counts:
        if not supported(k, 0, heads):
            continue
        buf = torch.zeros((1, 2, 1, k.shape[2], heads, k.shape[4]), dtype=k.dtype, device=k.device)
        for scatter in (False, True):  # the grid's cap is not specialized on: one kernel whatever it is
            move(*scratch, idx, 0, 1, 0, heads, buf, rows, scatter)
