"""The decode-path Triton kernels against plain torch (skipped without CUDA): split-KV
paged decode attention, fused RoPE + KV-cache store, the two-stage argmax and the
unpacking of a CUDA graph's packed inputs (a StepPlan's body); on CUDA also the greedy
ids a graph replay computes.

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_kernels.py
(TRITON_INTERPRET=1 runs them on CPU through Triton's interpreter, in float16 since
the interpreter mishandles bfloat16; triton 3.6's interpreter needs numpy < 2.3.)"""
from __future__ import annotations

import os

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
    from engine.triton_attention import paged_decode
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


def test_num_splits_fills_the_gpu_at_small_batches():
    from engine.triton_attention import num_splits
    cpu = torch.device("cpu")  # counts as 132 SMs
    assert num_splits(1, 8, cpu) == 32
    assert num_splits(16, 8, cpu) == 2
    assert num_splits(32, 8, cpu) == 1
    assert num_splits(1, 1, cpu) == 64


@pytest.mark.parametrize("heads, kv_heads, d", [(4, 1, 64), (8, 2, 128), (7, 7, 64)])
def test_rope_store_kv_matches_torch(heads, kv_heads, d):
    from engine.layers import RotaryEmbedding
    from engine.triton_ops import rope_store_kv
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
    from engine.triton_ops import argmax
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


def _unpack(plan, maxb: int, width: int, b: int):
    """Run the unpack kernel over [n, m] + plan.body into static inputs of maxb rows
    (filled with 7s, tables with -5s) for bucket b; returns them on the host."""
    from engine.triton_ops import unpack_decode_inputs
    _, n, m, _ = plan.dims
    src = torch.zeros(2 + plan.body.size + 9, dtype=torch.long)
    src[:2 + plan.body.size] = torch.cat([torch.tensor([n, m]), torch.from_numpy(plan.body)])
    d_ids, d_pos = torch.full((maxb,), 7), torch.full((maxb,), 7)
    d_slots, d_ctx = torch.full((maxb,), 7), torch.full((maxb,), 7, dtype=torch.int32)
    d_tables = torch.full((maxb, width), -5, dtype=torch.int32)
    bufs = [t.to(DEV) for t in (src, d_ids, d_pos, d_slots, d_ctx, d_tables)]
    unpack_decode_inputs(bufs[0], bufs[1][:b], bufs[2][:b], bufs[3][:b], bufs[4][:b], bufs[5][:b])
    return [t.cpu() for t in bufs[1:]]


def test_unpack_decode_inputs_pads_rows_past_n():
    from engine.model_runner import StepPlan
    maxb, width, n, m = 8, 6, 3, 4
    ids, pos, slots = torch.arange(n) + 10, torch.arange(n) + 20, torch.tensor([5, -1, 7])
    ctx, tables = torch.tensor([9, 0, 13]), torch.arange(n * m).view(n, m) + 100
    plan = StepPlan(ids, pos, slots, torch.ones(n, dtype=torch.long), ctx, tables, torch.tensor([0, 2]))
    assert plan.dims == (n, n, m, 2) and torch.equal(plan.block_tables, tables)
    assert torch.equal(plan.context_lens, ctx) and plan.sample_tokens.tolist() == [0, 2]
    b = 5  # the bucket: rows n..b-1 are padding, rows past b untouched
    d_ids, d_pos, d_slots, d_ctx, d_tables = _unpack(plan, maxb, width, b)
    assert d_ids.tolist() == [10, 11, 12, 0, 0, 7, 7, 7]
    assert d_pos.tolist() == [20, 21, 22, 0, 0, 7, 7, 7]
    assert d_slots.tolist() == [5, -1, 7, -1, -1, 7, 7, 7]
    assert d_ctx.tolist() == [9, 0, 13, 0, 0, 7, 7, 7]
    assert torch.equal(d_tables[:n, :m], tables.int())
    assert (d_tables[:, m:] == -5).all() and (d_tables[n:] == -5).all()


def test_unpack_decode_inputs_of_a_built_decode_plan():
    from types import SimpleNamespace
    from engine.model_runner import StepPlan
    bs = 4
    def seq(tokens, table):  # a sequence whose last token is not yet in the cache
        return SimpleNamespace(num_computed_tokens=len(tokens) - 1, block_table=table,
                               token_ids=lambda a, b: tokens[a:b])
    seqs = [seq([3, 1, 4, 1, 5], [7, 2]), seq([9] * 9, [4, 0, 6]), seq([2], [5])]
    plan = StepPlan.build(seqs, [1, 1, 1], [0, 1, 2], bs)
    assert plan.dims == (3, 3, 3, 3)
    assert plan.positions.tolist() == [4, 8, 0] and plan.slot_mapping.tolist() == [2 * bs, 6 * bs, 5 * bs]
    d_ids, d_pos, d_slots, d_ctx, d_tables = _unpack(plan, 4, 5, 4)
    assert d_ids.tolist() == [5, 9, 2, 0] and d_pos.tolist() == [4, 8, 0, 0]
    assert d_slots.tolist() == [8, 24, 20, -1] and d_ctx.tolist() == [5, 9, 1, 0]
    assert d_tables[:3, :3].tolist() == [[7, 2, 0], [4, 0, 6], [5, 0, 0]]


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs")
def test_graph_replay_greedy_ids_are_the_argmax_of_its_logits(tiny_models):
    """Every decode step replayed from a graph leaves greedy ids equal to the argmax
    (first index on ties) of the logits it returns, the engine emits them, and a step
    that samples only some rows gathers the same logits and ids."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.model_runner import StepPlan
    from engine.sampling_params import SamplingParams
    cfg = EngineConfig(model=tiny_models["llama"], device="cuda", kv_blocks=64, block_size=16, max_num_seqs=8)
    with LLMEngine(cfg) as engine:  # bfloat16: ties among the logits are common
        runner = engine.executor.runner
        assert runner.graphs is not None and runner.graphs.greedy
        seen, execute = [], runner.execute

        def spy(plan):
            logits = execute(plan)
            seen.append((logits.clone(), None if runner.greedy_ids is None else runner.greedy_ids.clone()))
            return logits
        runner.execute = spy
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        seqs = [engine.add_request(list(range(1, 1 + k)), params) for k in (5, 17, 40)]
        engine.step()  # the prompts: eager
        assert seen[-1][1] is None
        for _ in range(20):  # 3 sequences: bucket 4, one padded row
            outs = engine.step()
            logits, ids = seen[-1]
            assert logits.dtype == torch.bfloat16 and ids is not None
            assert torch.equal(ids, logits.float().argmax(-1))
            assert [o.token_id for o in outs] == ids.tolist()
        runner.execute = execute
        every = StepPlan.build(seqs, [1, 1, 1], [0, 1, 2], cfg.block_size)
        logits_all, ids_all = runner.execute(every).clone(), runner.greedy_ids.clone()
        some = StepPlan.build(seqs, [1, 1, 1], [0, 2], cfg.block_size)  # the same step again (same KV writes)
        logits_some, ids_some = runner.execute(some), runner.greedy_ids
        assert torch.equal(logits_some, logits_all[[0, 2]]) and torch.equal(ids_some, ids_all[[0, 2]])
