"""Prefill CUDA graphs (skipped without a GPU): a replay gives the eager step's logits and
KV for prompts, chunked prefill and mixed batches of every bucket size, and the events
a replay records after each layer order a side stream's gather of that layer's KV
(the NCCL send path's gather kernel) behind the layer, not behind the whole step.

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_prefill_graphs.py"""
from __future__ import annotations

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.engine.model_runner import ModelRunner, StepPlan
from pdserve.engine.loader import resolve_model
from pdserve.engine.prefill_graphs import token_buckets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def runner_for(path, dtype="float32", **kw) -> ModelRunner:
    cfg = EngineConfig(model=path, device="cuda", dtype=dtype, kv_blocks=256, block_size=16, max_num_seqs=8,
                       max_num_batched_tokens=kw.pop("tokens", 512), **kw)
    return ModelRunner(cfg, resolve_model(cfg.model), 0)


def plan_of(seqs, block_size: int, vocab: int, gen: torch.Generator) -> StepPlan:
    """seqs: (block table, tokens already cached, new tokens); every row sampled."""
    ids, pos, slots, qlens, clens, sample = [], [], [], [], [], []
    for table, start, n in seqs:
        for p in range(start, start + n):
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        ids.extend(torch.randint(0, vocab, (n,), generator=gen).tolist())
        qlens.append(n)
        clens.append(start + n)
        sample.append(len(ids) - 1)
    width = max(len(t) for t, _, _ in seqs)
    tables = torch.tensor([t + [0] * (width - len(t)) for t, _, _ in seqs])
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return StepPlan(t(ids), t(pos), t(slots), t(qlens), t(clens), tables, t(sample))


def test_buckets_cover_every_step_size():
    assert token_buckets(24) == [16, 24]
    b = token_buckets(8192)
    assert b[:5] == [16, 32, 64, 128, 256] and b[-1] == 8192
    assert all(y - x <= 512 and (y - x <= 128 or x >= 2048) for x, y in zip(b, b[1:]))


def test_replay_matches_eager_logits_and_kv(tiny_models):
    r = runner_for(tiny_models["llama"])
    pg = r.prefill_graphs
    assert pg is not None and pg.buckets[-1] == 512
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(256, generator=gen).tolist()
    tables = [perm[i * 32:(i + 1) * 32] for i in range(8)]
    steps = [  # (table, cached, new) per sequence: lone prompts of bucket sizes and between, then mixed steps
        [(tables[0], 0, 16)], [(tables[1], 0, 100)], [(tables[2], 0, 512)], [(tables[3], 0, 129)],
        [(tables[0], 16, 70), (tables[1], 100, 1), (tables[3], 129, 33)],
        [(tables[4], 0, 5), (tables[5], 0, 300), (tables[2], 400, 1), (tables[0], 86, 1)],
    ]
    for seqs in steps:
        plan = plan_of(seqs, 16, r.spec.vocab_size, gen)
        assert pg.fits(plan)
        blocks = sorted({b for t, s, n in seqs for b in t[s // 16:-(-(s + n) // 16)]})
        idx = torch.tensor(blocks, device="cuda")
        graph_logits = r.execute(plan)
        graph_kv = r.kv.k[:, idx].clone(), r.kv.v[:, idx].clone()
        eager_logits = r._eager(plan, []).float()
        torch.cuda.synchronize()
        torch.testing.assert_close(graph_logits, eager_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(graph_logits.argmax(-1), eager_logits.argmax(-1))
        torch.testing.assert_close(graph_kv[0], r.kv.k[:, idx], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graph_kv[1], r.kv.v[:, idx], atol=1e-5, rtol=1e-5)


def gather_setup(model: str, seed: int):
    """A bf16 runner, a 512-token prefill plan over 32 random blocks, its layer events, and
    the NCCL path's gather kernel with the blocks' index (skips where events cannot be recorded)."""
    from pdserve.kv_transfer.nccl import kernels as nccl_kernels
    r = runner_for(model, dtype="bfloat16")
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(256, generator=gen)[:32].tolist()
    plan = plan_of([(table, 0, 512)], 16, r.spec.vocab_size, gen)
    events = r.prefill_graphs.layer_events(plan)
    if events is None:
        pytest.skip("this torch cannot record external events in a graph")
    return r, table, plan, events, nccl_kernels.Mover(r.kv.k, r.kv.v), torch.tensor(table, dtype=torch.long,
                                                                                   device="cuda")


def test_layer_events_order_a_side_stream_gather(tiny_models):
    """After a replay, a side stream that waits on layer l's event and gathers layer l's KV
    (nccl_kernels.Mover, as a send does) sees that layer's final KV, though the whole
    forward is still running: the events are the graph's own, recorded in this replay."""
    r, table, plan, events, mover, idx = gather_setup(tiny_models["llama"], 1)
    layers, heads = r.spec.num_layers, r.kv.kv_heads
    side = torch.cuda.Stream()
    for trial in range(3):
        r.kv.k.zero_()
        r.kv.v.zero_()
        bufs = [torch.full((1, 2, len(table), 16, heads, r.spec.head_dim), -1.0, dtype=r.kv.k.dtype, device="cuda")
                for _ in range(layers)]
        rows = torch.zeros(layers, 2 * len(table), dtype=torch.int64, device="cuda")
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # the replay queues behind this: the gathers are queued before layer 0 runs
        r.execute(plan)
        for l in range(layers):
            side.wait_event(events[l])
            mover.move(idx, l, l + 1, 0, heads, bufs[l].view(-1).view(torch.int32), rows, False, stream=side)
        torch.cuda.synchronize()
        for l in range(layers):
            want = torch.stack((r.kv.k[l, idx], r.kv.v[l, idx]))[None]
            assert want.abs().sum() > 0
            assert torch.equal(bufs[l], want), f"trial {trial}: layer {l} gathered before it was written"


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """The tiny llama with 8 layers: a forward long enough for a gather to overlap it."""
    from transformers import AutoModelForCausalLM
    from tests.conftest import tiny_config
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 8
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deep_llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def test_a_layer_gather_overlaps_the_rest_of_the_replay(deep_llama):
    """The point of the layer events: the side stream's gather of layer 0 waits for layer 0
    only, so it is done while the replay still runs the later layers (device timestamps:
    the gather's end event against the step's end event on the compute stream)."""
    r, table, plan, events, mover, idx = gather_setup(deep_llama, 2)
    heads = r.kv.kv_heads
    side = torch.cuda.Stream()
    buf = torch.empty((1, 2, len(table), 16, heads, r.spec.head_dim), dtype=r.kv.k.dtype, device="cuda")
    rows = torch.zeros(1, 2 * len(table), dtype=torch.int64, device="cuda")
    r.execute(plan)  # warm: the first replay and the gather kernel's first launch
    torch.cuda.synchronize()
    overlapped = 0
    for _ in range(5):
        start, step_end, gather_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda._sleep(20_000_000)  # everything below is queued before layer 0 runs
        start.record()
        r.execute(plan)
        step_end.record()
        side.wait_event(events[0])
        mover.move(idx, 0, 1, 0, heads, buf.view(-1).view(torch.int32), rows, False, stream=side)
        gather_end.record(side)
        torch.cuda.synchronize()
        overlapped += start.elapsed_time(gather_end) < start.elapsed_time(step_end)
    assert overlapped >= 4, f"layer 0's gather ended after the step in {5 - overlapped} of 5 replays"
