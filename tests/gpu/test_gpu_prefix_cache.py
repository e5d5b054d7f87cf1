"""Prefix caching on CUDA (skipped without a GPU): prompts whose leading blocks are
cached run as prefills with a context offset (a few new tokens after a long cached
context) on the Triton kernels, eagerly and through the prefill CUDA graphs, with the
greedy tokens of transformers.

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_prefix_cache.py"""
from __future__ import annotations

import random

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.common.sampling import SamplingParams
from pdserve.engine.llm_engine import LLMEngine
from tests.conftest import assert_matches_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graphs"])
def test_cuda_prefills_after_a_cached_prefix_match_transformers(tiny_models, reference, eager):
    path = tiny_models["llama"]
    rng = random.Random(21)
    system = [rng.randrange(384) for _ in range(150)]         # 9 full blocks of 16 and 6 tokens
    prompts = [system + [rng.randrange(384) for _ in range(n)] for n in (1, 3, 10, 17, 40)]
    cfg = EngineConfig(model=path, device="cuda", dtype="float32", kv_blocks=256, block_size=16, max_num_seqs=8,
                       max_num_batched_tokens=256, enforce_eager=eager)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLMEngine(cfg) as engine:
        first = engine.generate(prompts[:1], params)
        rest = engine.generate(prompts, params)                # all but the first find 9 cached blocks
        again = engine.generate(prompts[::-1], params)         # whole prompts cached (less their last block)
        assert engine.blocks.hit_tokens >= 9 * 16 * 9
        assert engine.blocks.num_free == engine.blocks.num_blocks
    ref = reference(path)
    for p, out in zip(prompts[:1] + prompts + prompts[::-1], first + rest + again):
        assert_matches_reference(out.token_ids, ref.generate(p, 12), f"cuda prefix eager={eager}")
