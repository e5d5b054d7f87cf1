"""The fused copy kernel of the cuda-ipc transport (Triton, GPU; the interpreter runs it on CPU in tests).

One launch moves layers [l0, l1) of a transfer's block rows (a layer's k or v of one
block: block_size tokens of `heads` heads) from this rank's paged pool into the
reserved blocks of a peer's opened pool, block i of sidx to block i of didx, and in the
same pass over the bytes writes each row's checksum: the row's int32 words summed mod
2**32, times (its index in the layer + 1), into rows[layer, index] (as the NCCL
mover's rows). A second launch, after the last layer, sums the destination rows the
same way; the two per-layer sums must agree.

What a checksum covers (`full`): every word of the row. Sampled (the default): one token
slot of each row, a different one per row and layer ((index + layer) % block_size), which
the copy sums from registers and the check reads back, 1/block_size of the bytes. The copy
itself is a device-to-device move that cannot flip bits; what can go wrong is where it
lands (block ids, a stale or overwritten block, a pool reopened under another layout),
and a misplaced or overwritten row shows in its sampled slot as in all of it."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["l0", "nb", "sh", "dh", "total", "rounds"])
def _copy_rows(src_k, src_v, dst_k, dst_v, sidx, didx, rows, l0, nb, s_layer, s_block, s_tok, d_layer, d_block,
               d_tok, sh, dh, total, rounds, WPH: tl.constexpr, SEG: tl.constexpr, SEGP: tl.constexpr,
               BS: tl.constexpr, TB: tl.constexpr, COPY: tl.constexpr, SAMPLE: tl.constexpr):
    """COPY: move the rows and sum the source (the sampled slot where SAMPLE); else sum the
    destination rows' words (only the sampled slot where SAMPLE). Sizes and strides are in
    int32 words; sh/dh are the first head on each side, in heads. Program p takes rows p,
    p + programs, ... in `rounds` rounds."""
    per_layer = 2 * nb
    t = tl.arange(0, TB)[:, None]
    w = tl.arange(0, SEGP)[None, :]
    i = 0
    while i < rounds:  # not range(): Triton's interpreter cannot loop to a runtime bound that way
        first = tl.program_id(0) + i * tl.num_programs(0)
        i += 1
        live = (t * 0 + first) < total  # [TB, 1]: the interpreter refuses scalar masks
        pid = tl.minimum(first, total - 1)
        lg = pid // per_layer
        r = pid % per_layer          # index in the layer: kv * nb + j
        kv = r // nb
        j = r % nb
        layer = (l0 + lg).to(tl.int64)
        slot = (r + l0 + lg) % BS
        dbase = layer * d_layer + tl.load(didx + j).to(tl.int64) * d_block + dh * WPH
        acc = tl.zeros([TB, SEGP], dtype=tl.int64)
        if COPY:
            sbase = layer * s_layer + tl.load(sidx + j).to(tl.int64) * s_block + sh * WPH
            for t0 in range(0, BS, TB):
                mask = (t0 + t < BS) & (w < SEG) & live
                src = sbase + (t0 + t) * s_tok + w
                dst = dbase + (t0 + t) * d_tok + w
                if kv == 0:
                    x = tl.load(src_k + src, mask=mask, other=0)
                    tl.store(dst_k + dst, x, mask=mask)
                else:
                    x = tl.load(src_v + src, mask=mask, other=0)
                    tl.store(dst_v + dst, x, mask=mask)
                if SAMPLE:
                    acc += tl.where(t0 + t == slot, x, 0).to(tl.int64)
                else:
                    acc += x.to(tl.int64)
        elif SAMPLE:
            mask = (t == 0) & (w < SEG) & live
            dst = dbase + (slot + t) * d_tok + w
            if kv == 0:
                x = tl.load(dst_k + dst, mask=mask, other=0)
            else:
                x = tl.load(dst_v + dst, mask=mask, other=0)
            acc += x.to(tl.int64)
        else:
            for t0 in range(0, BS, TB):
                mask = (t0 + t < BS) & (w < SEG) & live
                dst = dbase + (t0 + t) * d_tok + w
                if kv == 0:
                    x = tl.load(dst_k + dst, mask=mask, other=0)
                else:
                    x = tl.load(dst_v + dst, mask=mask, other=0)
                acc += x.to(tl.int64)
        s = tl.sum(tl.sum(acc, axis=1), axis=0)
        s32 = ((s + 2147483648) & 4294967295) - 2147483648  # the int32 sum's wrap-around, sign-extended
        if first < total:
            tl.store(rows + layer * per_layer + r, s32 * (r + 1).to(tl.int64))


def supported(k: torch.Tensor, peer_k: torch.Tensor, heads: int) -> bool:
    """Whether the kernel can move `heads` heads between these pools: both contiguous, on one
    device, same dtype and token geometry, and a head whole int32 words."""
    return (k.is_contiguous() and peer_k.is_contiguous() and k.device == peer_k.device and k.dtype == peer_k.dtype
            and k.shape[2] == peer_k.shape[2] and k.shape[4] == peer_k.shape[4]
            and k.shape[4] * k.element_size() % 4 == 0 and heads > 0)


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.int32)


NUM_WARPS = 4        # the launch's warps per program (benchmarks/kv_ipc.py --tune sweeps these two)
TILE_WORDS = 4096    # int32 words a program moves per iteration (tokens x heads x head words)


class PoolCopier:
    """The kernel bound to this rank's pool (k, v: [layers, blocks, block_size, kv_heads,
    head_dim]); plan() binds it to one route of one transfer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.k32, self.v32 = _words(k), _words(v)
        self.es, self.bs, self.hd = k.element_size(), k.shape[2], k.shape[4]
        self.wph = self.hd * self.es // 4
        self.strides = tuple(n * self.es // 4 for n in k.stride()[:3])
        self._peers: dict[int, tuple] = {}     # id(peer k) -> (k32, v32, strides, k)
        self._compiled: dict[tuple, Any] = {}  # Launch.key -> the compiled kernel
        self.direct = k.is_cuda

    def _peer(self, pk: torch.Tensor, pv: torch.Tensor) -> tuple:
        got = self._peers.get(id(pk))
        if got is None or got[3] is not pk:
            got = self._peers[id(pk)] = (_words(pk), _words(pv), tuple(n * self.es // 4 for n in pk.stride()[:3]), pk)
        return got

    def plan(self, pk: torch.Tensor, pv: torch.Tensor, sidx: torch.Tensor, didx: torch.Tensor, rows: torch.Tensor,
             sh: int, dh: int, heads: int, copy: bool, sample: bool) -> Launch:
        """Copy (copy=True) or checksum the destination of heads sh.. of this pool -> dh.. of
        the peer's (pk, pv), blocks sidx[i] -> didx[i]; row sums into rows [layers, 2 * len(didx)]
        int64. Launch.run(l0, l1) for each layer range."""
        return Launch(self, pk, pv, sidx, didx, rows, sh, dh, heads, copy, sample)


class Launch:
    """One route's launches for one transfer, arguments worked out once: once Triton compiled
    the variant, run() calls the compiled kernel directly (Triton's dispatch costs the host
    tens of microseconds per launch, and layer by layer that is the copy's critical path)."""

    def __init__(self, pool: PoolCopier, pk, pv, sidx, didx, rows, sh: int, dh: int, heads: int, copy: bool,
                 sample: bool):
        pk32, pv32, pstrides, _ = pool._peer(pk, pv)
        self.pool, self.nb = pool, len(didx)
        seg = heads * pool.wph
        segp = triton.next_power_of_2(seg)
        tb = max(1, min(triton.next_power_of_2(pool.bs), TILE_WORDS // segp))
        self.meta = (pool.wph, seg, segp, pool.bs, tb, copy, sample)
        self.key = (self.meta, NUM_WARPS, pstrides, pool.strides)
        self.tensors = (pool.k32, pool.v32, pk32, pv32, sidx, didx, rows)
        self.ints = (*pool.strides, *pstrides, sh, dh)
        self.ptrs = tuple(t.data_ptr() for t in self.tensors)
        self.aligned = not any(p % 16 for p in self.ptrs[4:])  # as the compiled kernel assumes

    def run(self, l0: int, l1: int, stream=None) -> None:
        """Layers [l0, l1) on `stream` (a torch stream; default: the current one)."""
        total = (l1 - l0) * 2 * self.nb
        if total == 0:
            return
        pool = self.pool
        compiled = pool._compiled.get(self.key) if self.aligned else None
        if compiled is not None:
            handle = (stream or torch.cuda.current_stream(pool.k.device)).cuda_stream
            compiled[(total, 1, 1)](*self.ptrs, l0, self.nb, *self.ints, total, 1, *self.meta, stream=handle)
            return
        wph, seg, segp, bs, tb, copy, sample = self.meta
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            kernel = _copy_rows[(total,)](*self.tensors, l0, self.nb, *self.ints, total, 1, WPH=wph, SEG=seg,
                                          SEGP=segp, BS=bs, TB=tb, COPY=copy, SAMPLE=sample, num_warps=NUM_WARPS)
        if pool.direct and self.aligned and hasattr(kernel, "function"):
            pool._compiled[self.key] = kernel
