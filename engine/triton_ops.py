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
