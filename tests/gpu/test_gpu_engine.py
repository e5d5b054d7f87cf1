"""The engine on CUDA (skipped without a GPU): same greedy tokens as transformers in
float32, TP 2 over NCCL where two GPUs exist, and bfloat16 within bf16 rounding of it.

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu"""
from __future__ import annotations

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.common.sampling import SamplingParams
from tests.conftest import assert_matches_reference, assert_near_greedy
from tests.test_parity import mixed_workload, run_staggered

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_cuda_float32_matches_transformers(tiny_models, reference, family, tp):
    if tp > gpus():
        pytest.skip(f"needs {tp} GPUs")
    path = tiny_models[family]
    prompts, max_tokens = mixed_workload(3 + tp, 10, 384)
    cfg = EngineConfig(model=path, tp=tp, device="cuda", dtype="float32", kv_blocks=128, block_size=4,
                       max_num_batched_tokens=24, max_num_seqs=6)
    with LLMEngine(cfg) as engine:
        outs = run_staggered(engine, prompts, max_tokens)
        assert engine.blocks.num_free == engine.blocks.num_blocks
    ref = reference(path)
    for i, (p, m, ours) in enumerate(zip(prompts, max_tokens, outs)):
        assert_matches_reference(ours, ref.generate(p, m), f"cuda {family} tp{tp} request {i}")


def test_cuda_bfloat16_with_kv_pool_from_free_memory_picks_near_greedy_tokens(tiny_models, reference):
    """bf16 by default, the pool sized from free memory; every token is the float32
    reference's greedy choice up to bf16 rounding (assert_near_greedy), given our prefix."""
    cfg = EngineConfig(model=tiny_models["llama"], device="cuda", gpu_memory_utilization=0.05)
    prompts = [[1, 2, 3], list(range(5, 60)), list(range(300, 140, -1))]
    with LLMEngine(cfg) as engine:
        assert engine.executor.runner.kv.k.dtype == torch.bfloat16
        assert engine.blocks.num_blocks > 1000
        outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [16, 16, 16]
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert_near_greedy(reference(tiny_models["llama"]), p, o.token_ids, f"cuda bf16 request {i}")
