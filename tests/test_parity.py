"""Greedy outputs equal transformers' generate(do_sample=False) token for token."""
from __future__ import annotations

import random

import pytest

from pdserve.common.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.common.sampling import SamplingParams
from tests.conftest import assert_matches_reference


def mixed_workload(seed: int, n: int, vocab: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    max_tokens = [rng.randint(1, 24) for _ in range(n)]
    return prompts, max_tokens


def run_staggered(engine: LLMEngine, prompts, max_tokens, join_every: int = 2):
    """Admit requests a few at a time while earlier ones decode, so they join and
    finish at different steps; return each request's generated token ids."""
    seqs, pending, steps = [], list(zip(prompts, max_tokens)), 0
    while pending or any(not s.is_finished for s in seqs):
        if pending and steps % join_every == 0:
            for p, m in pending[:3]:
                seqs.append(engine.add_request(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)))
            pending = pending[3:]
        engine.step()
        steps += 1
    return [s.output_token_ids for s in seqs]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_continuous_batch_with_chunked_prefill_matches_transformers(tiny_models, reference, family, tp):
    path = tiny_models[family]
    prompts, max_tokens = mixed_workload(len(family) * 7 + tp, 10, 384)
    cfg = EngineConfig(model=path, tp=tp, kv_blocks=128, block_size=4, max_num_batched_tokens=24,
                       max_num_seqs=6, chunked_prefill=True)
    with LLMEngine(cfg) as engine:
        outs = run_staggered(engine, prompts, max_tokens)
        assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    ref = reference(path)
    for i, (p, m, ours) in enumerate(zip(prompts, max_tokens, outs)):
        assert_matches_reference(ours, ref.generate(p, m), f"{family} tp{tp} request {i}")


def test_preemption_under_a_tiny_pool_still_yields_reference_outputs(tiny_models, reference):
    path = tiny_models["llama"]
    prompts, _ = mixed_workload(7, 8, 384)
    cfg = EngineConfig(model=path, kv_blocks=24, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    with LLMEngine(cfg) as engine:
        seqs = [engine.add_request(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
                for p in prompts]
        while engine.has_work():
            engine.step()
        assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"
        assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    ref = reference(path)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        assert_matches_reference(s.output_token_ids, ref.generate(p, 24), f"request {i}")


CHATS = ["What is the capital of France?",
         "Write a haiku about the sea.",
         "List three prime numbers and explain why they are prime."]


def test_smollm2_chat_prompts_match_transformers(smol_dir, tokenizer, reference):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for c in CHATS]
    with LLMEngine(EngineConfig(model=smol_dir, kv_blocks=256)) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    ref = reference(smol_dir)
    for chat, p, out in zip(CHATS, prompts, outs):
        assert_matches_reference(out.token_ids, ref.generate(p, 32, stop_at_eos=True), chat)
    assert "Paris" in outs[0].text


def test_smollm2_at_tp3_replicates_nothing_and_matches(smol_dir, tokenizer, reference):
    """9 heads / 3 KV heads: TP 3 gives each rank 3 query heads and 1 KV head."""
    p = tokenizer.apply_chat_template([{"role": "user", "content": CHATS[0]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    with LLMEngine(EngineConfig(model=smol_dir, tp=3, kv_blocks=64)) as engine:
        out = engine.generate([p], SamplingParams(max_tokens=12, temperature=0))[0]
    assert_matches_reference(out.token_ids, reference(smol_dir).generate(p, 12, stop_at_eos=True), "tp3")


def test_tp_size_that_does_not_divide_heads_is_refused(tiny_models):
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        LLMEngine(EngineConfig(model=tiny_models["qwen2"], tp=3)).start()
