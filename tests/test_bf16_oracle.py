"""assert_near_greedy, the check the bf16 GPU tests make (tests/conftest.py), on CPU: a
bf16 engine run passes it, and a run with one wrong token fails it."""
from __future__ import annotations

import pytest

from pdserve.common.config import EngineConfig
from pdserve.common.sampling import SamplingParams
from pdserve.engine.llm_engine import LLMEngine
from tests.conftest import assert_near_greedy


def test_a_bf16_run_is_near_greedy_and_a_wrong_token_is_caught(tiny_models, reference):
    path = tiny_models["llama"]
    prompts = [[1, 2, 3], list(range(5, 60))]
    cfg = EngineConfig(model=path, device="cpu", dtype="bfloat16", kv_blocks=64, block_size=16)
    with LLMEngine(cfg) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    ref = reference(path)
    for p, o in zip(prompts, outs):
        assert_near_greedy(ref, p, o.token_ids, "cpu bf16")
    bad = list(outs[1].token_ids)
    bad[5] = (bad[5] + 17) % 384
    with pytest.raises(AssertionError, match="step 5: token"):
        assert_near_greedy(ref, prompts[1], bad, "corrupted")
