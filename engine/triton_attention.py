"""Paged attention kernels for CUDA (Triton). Imported only where CUDA exists (or
under TRITON_INTERPRET=1 for tests); the CPU path is engine/attention.py's torch code.

KV cache layout per layer: [num_blocks, block_size, kv_heads, head_dim].
- store_kv: write this step's K/V into their slots; slot < 0 (a padded row) writes nowhere.
- paged_decode: one query token per sequence; a program per (sequence, KV head, split)
  handles the whole GQA group, so each K/V tile is read once for all its query heads;
  at small batches the context is split over several programs and merged after.
- paged_prefill: any number of query tokens per sequence after a cached prefix
  (chunked prefill), causal, without padding to the longest prompt."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv(K, V, KC, VC, SLOT, stride_kt, stride_vt, HD: tl.constexpr, HDP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    if slot < 0:
        return
    i = tl.arange(0, HDP)
    m = i < HD
    tl.store(KC + slot * HD + i, tl.load(K + t * stride_kt + i, mask=m), mask=m)
    tl.store(VC + slot * HD + i, tl.load(V + t * stride_vt + i, mask=m), mask=m)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] (rows contiguous); caches [nb, bs, kv_heads, head_dim]."""
    hd = k.shape[1] * k.shape[2]
    _store_kv[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                             HD=hd, HDP=triton.next_power_of_2(hd))


@triton.jit
def _decode(Q, KC, VC, O, OP, LSE, BT, CL, scale, stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
            stride_kb, stride_kt, stride_kh,
            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
            SPLITS: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CL + b)
    # This split's token range: whole BLOCK_N tiles, so every split but the last is full;
    # splits past the context get an empty range. Computed here from ctx, not at launch,
    # so a captured graph's fixed grid serves any context length.
    chunk = (ctx + SPLITS - 1) // SPLITS
    chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(Q + b * stride_qb + (kvh * G + g)[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < hi
        blk = tl.load(BT + b * stride_bt + t // BS, mask=tmask, other=0)
        off = blk.to(tl.int64) * stride_kb + (t % BS) * stride_kt + kvh * stride_kh
        k = tl.load(KC + off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(VC + off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one token
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty range (padded row, ctx 0) gives zeros
    h = kvh * G + g
    if SPLITS == 1:
        tl.store(O + b * stride_ob + h[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=gmask[:, None])
    else:  # partial result [B, H, SPLITS, D] fp32 and its log-sum-exp (-inf for an empty range)
        row = (b * tl.num_programs(1) * G + h) * SPLITS + split
        tl.store(OP + row[:, None] * D + d[None, :], out, mask=gmask[:, None])
        tl.store(LSE + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i)), mask=gmask)


@triton.jit
def _decode_combine(OP, LSE, O, stride_ob, stride_oh, SPLITS: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    row = (b * tl.num_programs(1) + h) * SPLITS + s
    lse = tl.load(LSE + row, mask=s < SPLITS, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(mx == float("-inf"), 0.0, mx))  # empty splits weigh 0
    den = tl.sum(w, 0)
    o = tl.load(OP + row[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)  # all empty (ctx 0): zeros
    tl.store(O + b * stride_ob + h * stride_oh + d, out.to(O.dtype.element_ty))


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: float32 stays IEEE (a float32 model is the parity oracle;
    tl.dot would round its inputs to tf32, about 1e-3 relative, enough to flip a greedy
    choice), half types keep the default."""
    return "ieee" if dtype == torch.float32 else None


_SMS: dict = {}


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits of the context per (sequence, KV head) in paged_decode: a pure function of
    the launch shape (a captured graph keeps its grid). Small batches get about two
    programs per SM; a batch that already fills the GPU runs one program per pair."""
    if device.type != "cuda":
        sms = 132
    else:
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in _SMS:
            _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
        sms = _SMS[key]
    pairs, s = batch * kv_heads, 1
    if pairs >= sms:
        return 1
    while s < 64 and pairs * (2 * s) <= 2 * sms:  # double while the grid stays within 2 programs/SM
        s *= 2
    return s


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """q [B, heads, D] -> [B, heads, D]; block_tables [B, M] int32, context_lens [B] int32 (0 = padded row).
    A program per (sequence, KV head, split) handles the GQA group over its share of the
    context; with several splits (small batches, "flash-decoding") a second kernel merges
    the partial results. splits: by default num_splits()."""
    b, h, d = q.shape
    kvh, bs = k_cache.shape[2], k_cache.shape[1]
    g = h // kvh
    out = torch.empty_like(q) if out is None else out
    splits = num_splits(b, kvh, q.device) if splits is None else splits
    part = lse = out
    if splits > 1:  # fp32 scratch (inside a captured graph, from the graph's pool)
        part = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    _decode[(b, kvh, splits)](q, k_cache, v_cache, out, part, lse, block_tables, context_lens, scale,
                              q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                              G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BS=bs, BLOCK_N=64,
                              SPLITS=splits, PREC=dot_precision(q.dtype), num_warps=4)
    if splits > 1:
        _decode_combine[(b, h)](part, lse, out, out.stride(0), out.stride(1),
                                SPLITS=splits, SP=triton.next_power_of_2(splits), D=d, num_warps=4)
    return out


@triton.jit
def _prefill(Q, KC, VC, O, BT, BTW, WORK, QS, QL, CL, scale, stride_qt, stride_qh, stride_ot, stride_oh,
             stride_kb, stride_kt, stride_kh,
             G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PREC: tl.constexpr):
    # one program per (tile, head): WORK[tile] = seq << 16 | the tile's index in the sequence,
    # -1 for padding. The block table's width is read from BTW: a captured graph's launch
    # arguments are fixed, the step's width is not.
    w = tl.load(WORK + tl.program_id(0))
    if w < 0:
        return
    seq = w >> 16
    mt = w & 0xFFFF
    h = tl.program_id(1)
    ql = tl.load(QL + seq)
    qs = tl.load(QS + seq)
    ctx = tl.load(CL + seq)
    row_bt = BT + seq.to(tl.int64) * tl.load(BTW)
    prefix = ctx - ql
    kvh = h // G
    m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < ql
    d = tl.arange(0, D)
    q = tl.load(Q + (qs + m)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mmask[:, None], other=0.0)
    qpos = prefix + m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    end = prefix + (mt + 1) * BLOCK_M  # causal: later keys are masked for every row of this tile
    end = ctx if end > ctx else end
    for start in range(0, end, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < ctx
        blk = tl.load(row_bt + t // BS, mask=tmask, other=0)
        off = blk.to(tl.int64) * stride_kb + (t % BS) * stride_kt + kvh * stride_kh
        k = tl.load(KC + off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        v = tl.load(VC + off[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where((t[None, :] <= qpos[:, None]) & tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(O + (qs + m)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                  table_width: torch.Tensor, work: torch.Tensor, query_starts: torch.Tensor,
                  query_lens: torch.Tensor, context_lens: torch.Tensor, block_m: int, scale: float) -> torch.Tensor:
    """q [T, heads, D] for all sequences' new tokens, flattened; each sequence's K/V
    (prefix + new, already stored) read through its block table. Causal.

    tables: the block tables, row after row, table_width[0] entries each (int32 on the
    device); work: the tiles of block_m query rows to compute (engine.step_inputs.tile_work),
    -1 entries skipped. Rows of q that no tile covers are left unwritten."""
    t, h, d = q.shape
    kvh, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    _prefill[(work.numel(), h)](q, k_cache, v_cache, out, tables, table_width, work, query_starts, query_lens,
                                context_lens, scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                G=h // kvh, D=d, BS=bs, BLOCK_M=block_m, BLOCK_N=max(16, min(64, bs * 4)),
                                PREC=dot_precision(q.dtype), num_warps=4)
    return out


def supported(head_dim: int, block_size: int) -> bool:
    """The kernels need a power-of-two head_dim >= 16 and a power-of-two block size."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0
