"""Fused elementwise kernels for CUDA (Triton): a decode step of a small model is
bound by the number of kernels as much as by bandwidth, so the norm, the residual
add, RoPE and SiLU*up each run as one kernel instead of five to fifteen.
Imported only where CUDA exists; engine/layers.py keeps the torch versions for CPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(X, R, W, Y, stride_x, stride_r, stride_y, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(Y.dtype.element_ty)
        tl.store(R + row * stride_r + cols, x, mask=mask)  # the new residual stream
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / N
    normed = (xf * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x) * weight; with residual: residual += x in place first, and the norm is of the sum."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty_like(x2)
    r = residual.view(-1, n) if residual is not None else x2
    _add_rms_norm[(x2.shape[0],)](x2, r, weight, y, x2.stride(0), r.stride(0), y.stride(0), n, eps,
                                  HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=4)
    return y.view(x.shape)


@triton.jit
def _rope(X, POS, COS, SIN, stride_t, stride_h, stride_c, H, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, HALF)[None, :]
    hm = h < H
    cos = tl.load(COS + pos * stride_c + i)
    sin = tl.load(SIN + pos * stride_c + i)
    base = X + t * stride_t + h * stride_h
    x1 = tl.load(base + i, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=hm, other=0.0).to(tl.float32)
    tl.store(base + i, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=hm)
    tl.store(base + HALF + i, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=hm)


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox RoPE in place on x [T, heads, D]; cos/sin [max_pos, D] float32 (first half used)."""
    t, h, d = x.shape
    _rope[(t,)](x, positions, cos, sin, x.stride(0), x.stride(1), cos.stride(0), h,
                HALF=d // 2, BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return x


@triton.jit
def _silu_mul(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g / (1.0 + tl.exp(-g)) * u).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    _silu_mul[(x2.shape[0], triton.cdiv(n, 1024))](x2, y, x2.stride(0), y.stride(0), n, BLOCK=1024, num_warps=4)
    return y.view(*x.shape[:-1], n)


@triton.jit
def _rope_store_kv(X, POS, COS, SIN, SLOT, KC, VC, stride_t, stride_c, H, HKV,
                   D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr):
    # X: one token's row of the fused projection, heads [q (H) | k (HKV) | v (HKV)] of D each
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    slot = tl.load(SLOT + t).to(tl.int64)
    store = slot >= 0  # a padded row writes nowhere
    HALF: tl.constexpr = D // 2
    h = tl.arange(0, BLOCK_H)[:, None]  # the rotated heads: q, then k
    i = tl.arange(0, HALF)[None, :]
    cos = tl.load(COS + pos * stride_c + i)
    sin = tl.load(SIN + pos * stride_c + i)
    base = X + t * stride_t + h * D
    hm = h < H + HKV
    x1 = tl.load(base + i, mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=hm, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(X.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(X.dtype.element_ty)
    qm = h < H
    tl.store(base + i, y1, mask=qm)  # q rotated in place
    tl.store(base + HALF + i, y2, mask=qm)
    km = hm & (h >= H) & store  # k rotated straight into the cache slot [kv_heads, D]
    kc = KC + slot * (HKV * D) + (h - H) * D
    tl.store(kc + i, y1.to(KC.dtype.element_ty), mask=km)
    tl.store(kc + HALF + i, y2.to(KC.dtype.element_ty), mask=km)
    vh = tl.arange(0, BLOCK_KV)[:, None]
    dd = tl.arange(0, D)[None, :]
    vm = (vh < HKV) & store
    v = tl.load(X + t * stride_t + (H + HKV + vh) * D + dd, mask=vm, other=0.0)
    tl.store(VC + slot * (HKV * D) + vh * D + dd, v.to(VC.dtype.element_ty), mask=vm)


def rope_store_kv(qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """One kernel for a layer's RoPE and KV-cache write: qkv [T, (heads + 2 kv_heads) * D]
    (rows contiguous) gets q rotated in place; k rotated and v go to their slots in
    k_cache/v_cache [nb, bs, kv_heads, D] (slot < 0 writes nowhere; qkv's k is left as is).
    Returns q, a [T, heads, D] view of qkv."""
    t = qkv.shape[0]
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    assert qkv.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    _rope_store_kv[(t,)](qkv, positions, cos, sin, slot_mapping, k_cache, v_cache, qkv.stride(0), cos.stride(0),
                         heads, kv_heads, D=d, BLOCK_H=triton.next_power_of_2(heads + kv_heads),
                         BLOCK_KV=triton.next_power_of_2(kv_heads), num_warps=4)
    return qkv[:, :heads * d].view(t, heads, d)


@triton.jit
def _argmax_chunks(X, VAL, IDX, stride_x, N, CHUNKS, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_x + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN counts as +inf (torch.argmax picks NaN too)
    best = tl.max(x, 0)
    # the first column holding the maximum (past-the-end columns are -inf and come after N)
    first = tl.min(tl.where(x == best, cols, N + BLOCK), 0)
    tl.store(VAL + row * CHUNKS + c, best)
    tl.store(IDX + row * CHUNKS + c, first)


@triton.jit
def _argmax_reduce(VAL, IDX, OUT, CHUNKS, CP: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CP)
    m = c < CHUNKS
    v = tl.load(VAL + row * CHUNKS + c, mask=m, other=float("-inf"))
    i = tl.load(IDX + row * CHUNKS + c, mask=m, other=0x7FFFFFFF)
    best = tl.max(v, 0)
    # chunks are in column order, so the smallest index among the best chunks is the first
    tl.store(OUT + row, tl.min(tl.where((v == best) & m, i, 0x7FFFFFFF), 0).to(tl.int64))


def argmax(x: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """x [R, N] -> [R] int64: the first index of each row's maximum, as torch.argmax(-1).
    Many programs over column chunks, then one small reduce per row (a one-block
    reduction over a 128K vocab is latency bound)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    r, n = x.shape
    chunks = triton.cdiv(n, block)
    val = torch.empty(r, chunks, dtype=torch.float32, device=x.device)
    idx = torch.empty(r, chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(r, dtype=torch.long, device=x.device)
    _argmax_chunks[(r, chunks)](x, val, idx, x.stride(0), n, chunks, BLOCK=block, num_warps=4)
    _argmax_reduce[(r,)](val, idx, out, chunks, CP=triton.next_power_of_2(chunks), num_warps=1)
    return out


@triton.jit
def _unpack_decode_inputs(SRC, IDS, POS, SLOTS, CTX, TABLES, stride_tab, BLOCK: tl.constexpr):
    # SRC (int64): [n, m, ids[n], positions[n], slots[n], context[n], tables[n, m], ...]
    r = tl.program_id(0)
    n = tl.load(SRC)
    m = tl.load(SRC + 1)
    if r < n:
        p = SRC + 2 + r
        tl.store(IDS + r, tl.load(p))
        tl.store(POS + r, tl.load(p + n))
        tl.store(SLOTS + r, tl.load(p + 2 * n))
        tl.store(CTX + r, tl.load(p + 3 * n).to(tl.int32))
        src = SRC + 2 + 4 * n + r * m
        for j in range(0, m, BLOCK):  # columns past m keep stale entries, never read (context)
            c = j + tl.arange(0, BLOCK)
            tl.store(TABLES + r * stride_tab + c, tl.load(src + c, mask=c < m).to(tl.int32), mask=c < m)
    else:  # a padded row: K/V written nowhere, nothing attended
        tl.store(IDS + r, 0)
        tl.store(POS + r, 0)
        tl.store(SLOTS + r, -1)
        tl.store(CTX + r, 0)


def unpack_decode_inputs(src: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                         context: torch.Tensor, tables: torch.Tensor) -> None:
    """Spread a packed decode step (see _unpack_decode_inputs) over the first rows of the
    static inputs of a captured graph; rows past n become padding (slot -1, context 0)."""
    _unpack_decode_inputs[(ids.shape[0],)](src, ids, positions, slots, context, tables, tables.stride(0),
                                           BLOCK=256, num_warps=1)
