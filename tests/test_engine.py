"""Engine behaviour beyond parity: requests in and out, KV export/import, validation."""
from __future__ import annotations

import json
import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.common.sampling import SamplingParams
from pdserve.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import assert_matches_reference

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_models):
    with LLMEngine(EngineConfig(model=tiny_models["llama"], kv_blocks=64, block_size=4)) as engine:
        yield engine


@pytest.mark.parametrize("p_tp, d_tp", [(1, 1), (2, 1), (1, 2)])
def test_kv_exported_by_layer_and_imported_elsewhere_decodes_like_the_original(tiny_models, reference, p_tp, d_tp):
    """The prefill-node / decode-node path inside one process: prefill only, export
    each layer's KV shards, import them into blocks reserved by a second engine, decode
    there. Heads are re-sliced between the TP sizes by hand here (kv_transfer does it
    between nodes)."""
    path = tiny_models["qwen2"]
    prompt = [5, 17, 99, 3, 250, 8, 8, 41, 77, 300, 12]
    params = SamplingParams(max_tokens=10, **GREEDY)
    with LLMEngine(EngineConfig(model=path, tp=p_tp, kv_blocks=32, block_size=4)) as prefill, \
         LLMEngine(EngineConfig(model=path, tp=d_tp, kv_blocks=32, block_size=4)) as decode:
        decode.reserve(4)  # offset the pool so block ids differ between the two sides
        seq = prefill.add_request(prompt, params, prefill_only=True)
        while not seq.is_finished:
            prefill.step()
        assert seq.finish_reason == "prefilled" and len(seq.output_token_ids) == 1
        layers = prefill.export_kv(seq, 0, 1) + prefill.export_kv(seq, 1)  # in two groups
        assert len(layers) == 2 and len(layers[0]) == p_tp
        assert layers[0][0].shape == (2, 3, 4, 2 // p_tp, 16)  # (K/V, blocks, block size, KV heads, head dim)
        layers = [list(torch.cat(shards, dim=3).chunk(d_tp, dim=3)) for shards in layers]
        prefill.release(seq)
        assert prefill.blocks.num_free == prefill.blocks.num_blocks

        blocks = decode.reserve(len(prompt) + params.max_tokens)
        decode.import_kv(blocks[:3], 0, layers)
        out = decode.add_prefilled(prompt, seq.output_token_ids[0], params, blocks)
        while not out.seq.is_finished:
            decode.step()
        assert decode.blocks.num_free == decode.blocks.num_blocks - 1  # only the offset block is held
    assert_matches_reference(out.seq.output_token_ids, reference(path).generate(prompt, 10), "transferred")


@pytest.mark.parametrize("blocks", [[4, 5, 6, 10, 11], [5, 2, 9, 3, 7, 11]], ids=["two-runs", "scattered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_imported_into_blocks_reads_back_the_same(blocks, dtype):
    """Runs of consecutive blocks are copied as slices, scattered ones with one index_copy_."""
    from pdserve.engine.kv_cache import KVCache
    kv = KVCache(2, 16, 4, 2, 8, dtype, torch.device("cpu"))
    data = torch.randn(2, len(blocks), 4, 2, 8).to(dtype)
    kv.import_layer(1, blocks, data)
    assert torch.equal(kv.export_layer(1, blocks), data)
    others = [b for b in range(16) if b not in blocks]
    assert not kv.export_layer(1, others).any() and not kv.k[0].any()  # nothing else written


def test_import_rejects_a_layer_of_the_wrong_shape(llama):
    blocks = llama.reserve(8)
    with pytest.raises(ValueError, match="expected"):
        llama.import_kv(blocks, 0, [[torch.zeros(2, 1, 4, 1, 16)]])
    llama.release(blocks)


def test_abort_frees_blocks_of_waiting_and_running_requests(llama):
    a = llama.add_request(list(range(1, 30)), SamplingParams(max_tokens=50, **GREEDY))
    llama.step()
    b = llama.add_request(list(range(1, 10)), SamplingParams(max_tokens=50, **GREEDY))
    llama.abort(a)
    llama.abort(b)
    assert a.finish_reason == b.finish_reason == "abort"
    assert not llama.has_work()
    assert llama.blocks.num_free == llama.blocks.num_blocks


def test_a_seed_reproduces_a_sample_whatever_else_is_in_the_batch(llama):
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = llama.generate([[3, 4, 5]], sampled)[0].token_ids
    crowd = llama.generate([[9, 9], [3, 4, 5], [100, 2, 7, 1]],
                           [SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True), sampled,
                            SamplingParams(max_tokens=20, **GREEDY)])[1].token_ids
    assert alone == crowd
    other = llama.generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    assert other[0].token_ids != alone


def test_top_k_1_equals_greedy(llama):
    greedy = llama.generate([[7, 8, 9]], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    topk = llama.generate([[7, 8, 9]], SamplingParams(max_tokens=10, temperature=0.8, top_k=1,
                                                       ignore_eos=True))[0].token_ids
    assert topk == greedy


def test_stop_token_ids_end_the_request_with_the_token_included(llama):
    full = llama.generate([[1, 2, 3]], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    stop = full[4]
    out = llama.generate([[1, 2, 3]], SamplingParams(max_tokens=10, stop_token_ids=[stop], **GREEDY))[0]
    assert out.token_ids == full[:full.index(stop) + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([1, 2, 384], SamplingParams(), "out of range"),
    ([-1], SamplingParams(), "out of range"),
    ([1] * 512, SamplingParams(), "context"),
    ([1] * 500, SamplingParams(max_tokens=20), "exceeds the context"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
    ([1], SamplingParams(temperature=float("nan")), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_k=-2), "top_k"),
    ([1], SamplingParams(stop=[""]), "stop"),
    ([1], SamplingParams(stop_token_ids=[999]), "stop_token_ids"),
])
def test_bad_requests_are_refused_with_a_readable_message_and_leave_nothing_behind(llama, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llama.add_request(prompt, params)
    assert not llama.has_work() and llama.blocks.num_free == llama.blocks.num_blocks


def test_request_needing_more_blocks_than_the_pool_is_refused(tiny_models):
    with LLMEngine(EngineConfig(model=tiny_models["llama"], kv_blocks=4, block_size=4)) as engine:
        with pytest.raises(ValueError, match="KV blocks"):
            engine.add_request(list(range(1, 15)), SamplingParams(max_tokens=8))


def test_stop_strings_cut_the_text_exactly(smol_dir, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with LLMEngine(EngineConfig(model=smol_dir, kv_blocks=64)) as engine:
        full = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0]
        assert "Paris" in full.text
        cut = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, stop=["Paris"]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index("Paris")]


def test_a_tp_rank_that_dies_makes_the_next_step_fail_instead_of_hanging(tiny_models):
    import os
    import signal
    engine = LLMEngine(EngineConfig(model=tiny_models["llama"], tp=2, kv_blocks=32, block_size=4)).start()
    try:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, **GREEDY))
        engine.step()
        worker = engine.executor.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        with pytest.raises(RuntimeError):
            for _ in range(50):
                engine.step()
    finally:
        engine.close()
    assert engine.executor is None


def test_step_trace_writes_one_line_per_step_with_the_forward_times(tiny_models, tmp_path, monkeypatch):
    """PDSERVE_STEP_TRACE (diagnostics): each step's line says how long the host took to
    queue the forward, in wall and in its own CPU time, and how long the whole step took."""
    monkeypatch.setenv("PDSERVE_STEP_TRACE", str(tmp_path))
    with LLMEngine(EngineConfig(model=tiny_models["llama"], kv_blocks=32, block_size=4)) as engine:
        engine.generate([[5, 17, 99, 3, 250, 8]], SamplingParams(max_tokens=3, **GREEDY))
    (path,) = tmp_path.glob("steps-*.jsonl")
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["tokens"] for s in steps] == [6, 1, 1]
    for s in steps:
        assert 0 < s["forward_ms"] <= s["queue_ms"] <= s["step_ms"] and s["forward_cpu_ms"] > 0
        assert s["gpu_ms"] is None and s["sends"] is False


def test_step_plan_matches_the_per_token_formulas_for_mixed_batches():
    """StepPlan.build (slots one range per block, tensors through array buffers) against
    the plain per-token definitions, for prompts, chunks and decodes of any offset."""
    import random

    from pdserve.engine.model_runner import StepPlan

    class Seq:
        def __init__(self, tokens, computed, table):
            self.tokens, self.num_computed_tokens, self.block_table = tokens, computed, table

        def token_ids(self, a, b):
            return self.tokens[a:b]

        def token_at(self, p):
            return self.tokens[p]

    rng = random.Random(0)
    for trial in range(300):
        one_each = trial >= 200  # decode steps: one new token per sequence (StepPlan's array path)
        bs = rng.choice([1, 4, 16])
        seqs, news = [], []
        for _ in range(rng.randint(1, 6)):
            total = rng.randint(1, 120)
            computed = rng.randint(0, total - 1)
            n = 1 if one_each else rng.randint(1, total - computed)
            seqs.append(Seq([rng.randrange(1000) for _ in range(total)], computed,
                            rng.sample(range(500), -(-total // bs))))
            news.append(n)
        rows = sorted(rng.sample(range(len(seqs)), rng.randint(0, len(seqs))))
        plan = StepPlan.build(seqs, news, rows, bs)
        ids, pos, slots, starts = [], [], [], []
        for s, n in zip(seqs, news):
            starts.append(len(ids))
            for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
                ids.append(s.tokens[p])
                pos.append(p)
                slots.append(s.block_table[p // bs] * bs + p % bs)
        width = max(len(s.block_table) for s in seqs)
        assert plan.input_ids.tolist() == ids and plan.positions.tolist() == pos
        assert plan.slot_mapping.tolist() == slots
        assert plan.query_lens.tolist() == news
        assert plan.context_lens.tolist() == [s.num_computed_tokens + n for s, n in zip(seqs, news)]
        assert plan.block_tables.tolist() == [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        assert plan.sample_tokens.tolist() == [starts[i] + news[i] - 1 for i in rows]
        assert all(t.dtype == torch.long for t in (plan.input_ids, plan.sample_tokens, plan.block_tables))


def test_a_first_token_that_splits_a_character_is_held_for_the_decode_node(tiny_models, tokenizer):
    """A prefill node's first token may be the first byte of an emoji: it sends no text
    (never "\\ufffd"), and the decode node's detokenizer, fed the same first token,
    emits the whole character once the later tokens complete it."""
    emoji = tokenizer.encode("🎉")
    assert len(emoji) > 1  # byte-level BPE spreads it over several tokens
    prompt = [5, 17, 99, 3, 250]
    for stop in ([], ["zz"]):  # the node detokenizes (no stop strings), or the engine does
        params = SamplingParams(max_tokens=8, stop=stop, **GREEDY)
        with LLMEngine(EngineConfig(model=tiny_models["llama"], kv_blocks=16, block_size=4)) as prefill, \
             LLMEngine(EngineConfig(model=tiny_models["llama"], kv_blocks=16, block_size=4)) as decode:
            prefill.tokenizer = decode.tokenizer = tokenizer
            seq = prefill._new_sequence(prompt, params, "r", True)
            delta, reason = prefill._postprocess(seq, emoji[0])
            assert (delta, reason) == ("", "prefilled")
            out = decode.add_prefilled(prompt, emoji[0], params, decode.reserve(len(prompt) + 8), "r")
            det = out.seq.detokenizer or IncrementalDetokenizer(tokenizer, prompt)
            if out.seq.detokenizer is None:
                assert det.step(emoji[0]) == ""
            deltas = [det.step(t) for t in emoji[1:]] + [det.flush()]
            assert deltas[:len(emoji) - 2] == [""] * (len(emoji) - 2) and "".join(deltas) == "🎉"
            decode.abort(out.seq)
