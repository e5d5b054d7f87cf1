"""The decode-path Triton kernels against plain torch (skipped without CUDA): split-KV
paged decode attention, fused RoPE + KV-cache store, the two-stage argmax and the
unpacking of a CUDA graph's packed inputs.

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_kernels.py
(TRITON_INTERPRET=1 runs them on CPU through Triton's interpreter, in float16 since
the interpreter mishandles bfloat16; triton 3.6's interpreter needs numpy < 2.3.)"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET, reason="needs CUDA")
DEV = "cpu" if INTERPRET else "cuda"


def ref_decode(q, k_cache, v_cache, tables, ctx, scale):
    """Softmax attention of each sequence's one query over its gathered context, in float32."""
    b, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(b, h, d)
    for i in range(b):
        n = int(ctx[i])
        if n == 0:
            continue
        blocks = tables[i, :-(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, kvh, d)[:n].float().repeat_interleave(h // kvh, 1)  # [n, h, d]
        v = v_cache[blocks].reshape(-1, kvh, d)[:n].float().repeat_interleave(h // kvh, 1)
        p = (torch.einsum("hd,nhd->hn", q[i].float(), k) * scale).softmax(-1)
        out[i] = torch.einsum("hn,nhd->hd", p, v)
    return out


@pytest.mark.parametrize("group, d", [(1, 64), (4, 128), (7, 64)])
@pytest.mark.parametrize("splits", [1, 3, 8, None])
def test_paged_decode_matches_torch(group, d, splits):
    from pdserve.engine.triton_attention import paged_decode
    torch.manual_seed(group * 1000 + d + (splits or 0))
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    kvh, bs, nb = 2, 16, 64
    ctx = torch.tensor([0, 1, 17, 64, 100, 333], dtype=torch.int32)  # 0: a padded row
    b, h = ctx.numel(), kvh * group
    k_cache = torch.randn(nb, bs, kvh, d).to(dtype)
    v_cache = torch.randn(nb, bs, kvh, d).to(dtype)
    tables = torch.stack([torch.randperm(nb)[:24] for _ in range(b)]).int()
    # q as a strided view of a wider buffer, as it comes out of the fused QKV projection
    q = torch.randn(b, h + 2 * kvh, d).to(dtype)[:, :h]
    scale = d ** -0.5
    ref = ref_decode(q, k_cache, v_cache, tables, ctx, scale)
    dev = lambda t: t.to(DEV)  # noqa: E731
    out = paged_decode(dev(q), dev(k_cache), dev(v_cache), dev(tables), dev(ctx), scale, splits=splits).float().cpu()
    assert out[0].abs().max() == 0  # context 0 outputs zeros
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def ref_prefill(q, k_cache, v_cache, tables, starts, qlens, ctx, scale):
    """Causal attention of each sequence's new rows over its prefix and themselves, float32."""
    bs, kvh, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    h = q.shape[1]
    out = torch.zeros(q.shape)
    for i in range(len(qlens)):
        s0, ql, n = int(starts[i]), int(qlens[i]), int(ctx[i])
        blocks = tables[i, :-(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, kvh, d)[:n].float().repeat_interleave(h // kvh, 1)
        v = v_cache[blocks].reshape(-1, kvh, d)[:n].float().repeat_interleave(h // kvh, 1)
        s = torch.einsum("thd,nhd->htn", q[s0:s0 + ql].float(), k) * scale
        qpos = torch.arange(n - ql, n)
        s = s.masked_fill(torch.arange(n)[None, :] > qpos[:, None], float("-inf"))
        out[s0:s0 + ql] = torch.einsum("htn,nhd->thd", s.softmax(-1), v)
    return out


@pytest.mark.parametrize("block_m", [16, 64])
def test_paged_prefill_tiles_match_torch(block_m):
    """Several sequences with cached prefixes (chunked prefill), one-row decodes among them,
    a tile list padded with -1 entries as a captured graph's is, and the block table read
    at the width the buffer gives: each row of each sequence as the reference."""
    from pdserve.engine.step_inputs import tile_work
    from pdserve.engine.triton_attention import paged_prefill
    torch.manual_seed(block_m)
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    kvh, group, d, bs, nb = 2, 3, 64, 16, 96
    h = kvh * group
    qlens = np.array([70, 1, 17, 130])
    ctx = np.array([70, 40, 50, 150])  # prefixes 0, 39, 33, 20
    starts = np.cumsum(qlens) - qlens
    width = 12
    tables = torch.stack([torch.randperm(nb)[:width] for _ in qlens]).int()
    k_cache = torch.randn(nb, bs, kvh, d).to(dtype)
    v_cache = torch.randn(nb, bs, kvh, d).to(dtype)
    t = int(qlens.sum())
    q = torch.randn(t + 5, h + 2 * kvh, d).to(dtype)[:, :h]  # strided, with 5 padded rows past the last sequence
    work = np.concatenate([tile_work(qlens, block_m), np.full(7, -1, dtype=np.int32)])
    scale = d ** -0.5
    dev = lambda x: torch.as_tensor(x).to(DEV)  # noqa: E731
    i32 = lambda x: dev(torch.as_tensor(x, dtype=torch.int32))  # noqa: E731
    out = paged_prefill(dev(q), dev(k_cache), dev(v_cache), dev(tables.flatten()), i32([width]), dev(torch.from_numpy(work)),
                        i32(starts), i32(qlens), i32(ctx), block_m, scale).float().cpu()
    ref = ref_prefill(q[:t], k_cache, v_cache, tables, starts, qlens, ctx, scale)
    torch.testing.assert_close(out[:t], ref, atol=2e-2, rtol=2e-2)


def test_tile_work_lists_every_tile_once():
    from pdserve.engine.step_inputs import max_tiles, tile_work
    qlens = np.array([1, 64, 65, 0, 200])
    work = tile_work(qlens, 64)
    pairs = [(int(w) >> 16, int(w) & 0xFFFF) for w in work]
    assert pairs == [(0, 0), (1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)]
    assert work.dtype == np.int32 and len(work) <= max_tiles(int(qlens.sum()), len(qlens))


@pytest.mark.skipif(INTERPRET, reason="the interpreter computes in numpy float32 either way")
def test_float32_attention_is_not_rounded_to_tf32():
    """A float32 model is the parity oracle: its attention must not round q, k, p or v to
    tf32 inside tl.dot (about 1e-3 relative, enough to flip a greedy near-tie)."""
    from pdserve.engine.step_inputs import tile_work
    from pdserve.engine.triton_attention import paged_decode, paged_prefill
    torch.manual_seed(7)
    kvh, group, d, bs, nb = 2, 4, 64, 16, 32
    h = kvh * group
    k_cache, v_cache = torch.randn(nb, bs, kvh, d), torch.randn(nb, bs, kvh, d)
    tables = torch.randperm(nb)[:24].int()[None]
    n = 300
    q = torch.randn(n, h, d)
    scale = d ** -0.5
    k = k_cache[tables[0, :-(-n // bs)].long()].reshape(-1, kvh, d)[:n].repeat_interleave(group, 1)
    v = v_cache[tables[0, :-(-n // bs)].long()].reshape(-1, kvh, d)[:n].repeat_interleave(group, 1)
    s = torch.einsum("thd,nhd->htn", q.double(), k.double()) * scale
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("htn,nhd->thd", s.softmax(-1), v.double()).float()
    cuda = lambda t: t.cuda()  # noqa: E731
    ctx = torch.tensor([n], dtype=torch.int32)
    work = torch.from_numpy(tile_work(np.array([n]), 64))
    width = torch.tensor([tables.shape[1]], dtype=torch.int32)
    out = paged_prefill(cuda(q), cuda(k_cache), cuda(v_cache), cuda(tables.flatten()), cuda(width), cuda(work),
                        cuda(torch.tensor([0], dtype=torch.int32)), cuda(ctx), cuda(ctx), 64, scale).cpu()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    last = paged_decode(cuda(q[-1:].contiguous()), cuda(k_cache), cuda(v_cache), cuda(tables), cuda(ctx), scale).cpu()
    torch.testing.assert_close(last, ref[-1:], atol=2e-5, rtol=1e-4)


def test_num_splits_fills_the_gpu_at_small_batches():
    from pdserve.engine.triton_attention import num_splits
    cpu = torch.device("cpu")  # counts as 132 SMs
    assert num_splits(1, 8, cpu) == 32
    assert num_splits(16, 8, cpu) == 2
    assert num_splits(32, 8, cpu) == 1
    assert num_splits(1, 1, cpu) == 64


@pytest.mark.parametrize("heads, kv_heads, d", [(4, 1, 64), (8, 2, 128), (7, 7, 64)])
def test_rope_store_kv_matches_torch(heads, kv_heads, d):
    from pdserve.engine.layers import RotaryEmbedding
    from pdserve.engine.triton_ops import rope_store_kv
    torch.manual_seed(heads + d)
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    t, nb, bs = 5, 4, 4
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    rotary = RotaryEmbedding(inv_freq, 1.0, 64)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d).to(dtype)
    positions = torch.tensor([0, 3, 17, 63, 5])
    slots = torch.tensor([3, -1, 0, 15, 9])  # -1: a padded row writes nowhere
    k_cache = torch.randn(nb, bs, kv_heads, d).to(dtype)
    v_cache = torch.randn(nb, bs, kv_heads, d).to(dtype)

    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    rq, rk = rotary(positions, q.reshape(t, heads, d).float(), k.reshape(t, kv_heads, d).float())
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    live = slots >= 0
    ref_k.view(-1, kv_heads, d)[slots[live]] = rk[live].to(dtype)
    ref_v.view(-1, kv_heads, d)[slots[live]] = v.reshape(t, kv_heads, d)[live]

    dev = lambda x: x.to(DEV)  # noqa: E731
    qkv_d, kc, vc = dev(qkv), dev(k_cache), dev(v_cache)
    out_q = rope_store_kv(qkv_d, heads, kv_heads, dev(positions), dev(rotary.cos), dev(rotary.sin), kc, vc,
                          dev(slots))
    assert out_q.data_ptr() == qkv_d.data_ptr() and out_q.shape == (t, heads, d)
    torch.testing.assert_close(out_q.float().cpu(), rq, atol=1e-2, rtol=1e-2)  # rounding to dtype
    torch.testing.assert_close(kc.float().cpu(), ref_k.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(vc.cpu(), ref_v)
    assert torch.equal(qkv_d[:, heads * d:].cpu(), qkv[:, heads * d:])  # k and v left as they were


@pytest.mark.parametrize("n, block", [(1000, 128), (5000, 2048), (128256, 2048)])
def test_argmax_first_index_like_torch(n, block):
    from pdserve.engine.triton_ops import argmax
    torch.manual_seed(n)
    x = torch.randn(6, n + 3)[:, :n]  # strided rows
    x[1] = float("-inf")                         # all -inf: index 0
    x[2, :] = 0.0
    x[2, n // 2] = x[2, n - 1] = 5.0             # a tie across chunks: the first
    x[3, 7] = x[3, 9] = 9.0                      # a tie within a chunk
    x[4, n - 1] = 100.0                          # the last column
    x[5, :n // 3] = float("-inf")
    got = argmax(x.to(DEV)).cpu()
    assert got.dtype == torch.long
    assert torch.equal(got, x.argmax(-1))
    xb = x.to(torch.bfloat16)  # many exact ties
    assert torch.equal(argmax(xb.to(DEV)).cpu(), xb.float().argmax(-1))


def test_unpack_decode_inputs_pads_rows_past_n():
    from pdserve.engine.triton_ops import unpack_decode_inputs
    maxb, width, n, m = 8, 6, 3, 4
    ids, pos, slots = torch.arange(n) + 10, torch.arange(n) + 20, torch.tensor([5, -1, 7])
    ctx, tables = torch.tensor([9, 0, 13]), torch.arange(n * m).view(n, m) + 100
    packed = torch.cat([torch.tensor([n, m]), ids, pos, slots, ctx, tables.flatten(), torch.tensor([2, 0])])
    src = torch.zeros(64, dtype=torch.long)
    src[:packed.numel()] = packed
    d_ids, d_pos = torch.full((maxb,), 7), torch.full((maxb,), 7)
    d_slots, d_ctx = torch.full((maxb,), 7), torch.full((maxb,), 7, dtype=torch.int32)
    d_tables = torch.full((maxb, width), -5, dtype=torch.int32)
    bufs = [t.to(DEV) for t in (src, d_ids, d_pos, d_slots, d_ctx, d_tables)]
    b = 5  # the bucket: rows n..b-1 are padding, rows past b untouched
    unpack_decode_inputs(bufs[0], bufs[1][:b], bufs[2][:b], bufs[3][:b], bufs[4][:b], bufs[5][:b])
    d_ids, d_pos, d_slots, d_ctx, d_tables = (t.cpu() for t in bufs[1:])
    assert d_ids.tolist() == [10, 11, 12, 0, 0, 7, 7, 7]
    assert d_pos.tolist() == [20, 21, 22, 0, 0, 7, 7, 7]
    assert d_slots.tolist() == [5, -1, 7, -1, -1, 7, 7, 7]
    assert d_ctx.tolist() == [9, 0, 13, 0, 0, 7, 7, 7]
    assert torch.equal(d_tables[:n, :m], tables.int())
    assert (d_tables[:, m:] == -5).all() and (d_tables[n:] == -5).all()
