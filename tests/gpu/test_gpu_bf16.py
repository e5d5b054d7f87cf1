"""bfloat16 greedy parity against transformers on model-sized random checkpoints
(skipped without CUDA): Llama-3.2-1B-shaped and Qwen2.5-0.5B-shaped, TP 1 and 2.

bf16 arithmetic differs between any two implementations, so the rule is DESIGN.md's
with a bf16 tolerance. Free-running: where our 32 greedy tokens leave the
reference's, the token we chose must be among the reference's TOP_K at that step
and its reference logit within BF16_ULPS units in the last place (bf16) of the top
one (a near-tie in bf16), never a clear miss. Through 16 layers of bf16 matrix
products summed in different orders, the two implementations' logits for one token
were seen up to 7 ulps apart on H200 (the top logits of these models are near 4,
where a bf16 ulp is 1/64), so the tolerance is 8 ulps. Random weights give flat logits (the top two of 128k random logits are
often closer than bf16 rounding), so a near-tie comes every ten steps or so and a
whole 32-token run rarely stays exact, for any two bf16 implementations. The
token-exactness check is therefore made step by step, teacher-forced: given the
reference's own prefix at each of the 32 steps, our next token must equal the
reference's in at least MIN_STEP_AGREEMENT of the steps, and every miss must be a
near-tie as above."""
from __future__ import annotations

import math
import random

import pytest
import torch

from benchmarks.common import hf_config
from pdserve.common.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.common.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BF16_ULPS = 8
TOP_K = 5
MIN_STEP_AGREEMENT = 0.8


def bf16_tolerance(top: float) -> float:
    """BF16_ULPS units in the last place of a bf16 number of magnitude |top| (8 significant bits)."""
    return BF16_ULPS * 2.0 ** (math.floor(math.log2(max(abs(top), 1e-3))) - 7)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    made = {}

    def get(shape: str):
        if shape not in made:
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
            path = tmp_path_factory.mktemp(shape)
            model.save_pretrained(path)
            made[shape] = (str(path), model)
        return made[shape]
    return get


def reference(model, prompt: list[int]):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [l[0].float() for l in out.logits]


@pytest.mark.parametrize("shape, tp", [("llama-3.2-1b", 1), ("qwen2.5-0.5b", 1), ("llama-3.2-1b", 2),
                                       ("qwen2.5-0.5b", 2)])
def test_bf16_greedy_matches_transformers_within_bf16_tolerance(checkpoints, shape, tp):
    if tp > torch.cuda.device_count():
        pytest.skip(f"needs {tp} GPUs")
    path, model = checkpoints(shape)
    rng = random.Random(tp)
    vocab = hf_config(shape).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 300))] for _ in range(8)]
    cfg = EngineConfig(model=path, tp=tp, device="cuda", dtype="bfloat16", max_model_len=1024,
                       gpu_memory_utilization=0.3)
    with LLMEngine(cfg) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
        # teacher-forced: every prefix of the reference's run, one token each
        refs = [reference(model, prompt) for prompt in prompts]
        forced = [prompt + tokens[:i] for prompt, (tokens, _) in zip(prompts, refs) for i in range(NEW_TOKENS)]
        step_outs = engine.generate(forced, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    exact, report = 0, []
    for prompt, out, (tokens, logits) in zip(prompts, outs, refs):
        diverged = next((i for i, (a, b) in enumerate(zip(out.token_ids, tokens)) if a != b), None)
        if diverged is None:
            exact += 1
            continue
        report.append(near_tie(shape, tp, logits[diverged], out.token_ids[diverged], f"free run, step {diverged}"))
    agree, misses = 0, []
    for j, out in enumerate(step_outs):
        tokens, logits = refs[j // NEW_TOKENS]
        i = j % NEW_TOKENS
        if out.token_ids[0] == tokens[i]:
            agree += 1
        else:
            misses.append(near_tie(shape, tp, logits[i], out.token_ids[0], f"teacher-forced, step {i}"))
    rate = agree / len(step_outs)
    print(f"{shape} tp{tp}: free run {exact}/{len(prompts)} exact over {NEW_TOKENS} tokens, divergences {report}; "
          f"teacher-forced agreement {agree}/{len(step_outs)} ({rate:.1%}), misses {misses}")
    assert rate >= MIN_STEP_AGREEMENT, f"{shape} tp{tp}: step agreement {rate:.1%} < {MIN_STEP_AGREEMENT:.0%}"


def near_tie(shape: str, tp: int, step_logits: torch.Tensor, ours: int, where: str) -> tuple:
    """Assert our token's reference logit is within bf16 tolerance of the top one; return the figures."""
    top = step_logits.max().item()
    shortfall = top - step_logits[ours].item()
    rank = int((step_logits > step_logits[ours]).sum())
    assert rank < TOP_K and shortfall <= bf16_tolerance(top), \
        f"{shape} tp{tp}: a clear miss ({where}): top logit {top:.3f}, ours short by {shortfall:.4f}, rank {rank}"
    return round(top, 3), round(shortfall, 4), rank
