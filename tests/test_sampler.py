import math
from collections import Counter

import pytest
import torch

from pdserve.engine.sampler import Sampler, make_generator
from pdserve.common.sampling import SamplingParams

VOCAB = 32


def sample(logits, params, prompt_ids=None, output_ids=None, generators=None):
    n = len(params)
    return Sampler()(logits, params, prompt_ids or [[]] * n, output_ids or [[]] * n,
                     generators or [None] * n)


def draws(logits_row, params, n=2000, seed=0):
    """Token counts from n samples of one row (one seeded generator across the draws)."""
    generator = make_generator(seed, "cpu")
    return Counter(Sampler()(logits_row[None], [params], [[]], [[]], [generator]).item() for _ in range(n))


def test_greedy_is_argmax_of_raw_logits():
    logits = torch.randn(8, VOCAB, dtype=torch.bfloat16)
    ids = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert ids.dtype == torch.int64 and ids.shape == (8,)
    assert torch.equal(ids, logits.argmax(-1))


def test_top_k_1_equals_greedy_even_at_temperature_1():
    torch.manual_seed(0)
    logits = torch.randn(16, VOCAB)
    ids = sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 16)
    assert torch.equal(ids, logits.argmax(-1))


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    ids = sample(logits, params)
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_seed_reproduces_samples_across_calls():
    logits = torch.randn(1, VOCAB)
    params = [SamplingParams(temperature=1.5, seed=1234)]

    def run():
        generator = make_generator(1234, "cpu")
        return [sample(logits, params, generators=[generator]).item() for _ in range(50)]

    first = run()
    assert run() == first
    assert len(set(first)) > 1


def test_seeded_row_is_independent_of_batch_composition():
    torch.manual_seed(0)
    row = torch.randn(VOCAB)
    seeded = SamplingParams(temperature=1.0, seed=7)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
              SamplingParams(temperature=1.0, repetition_penalty=1.3)]
    alone_gen, batch_gen = make_generator(7, "cpu"), make_generator(7, "cpu")
    alone, batched = [], []
    for _ in range(30):  # consecutive draws from the request's generator
        alone.append(sample(row[None], [seeded], generators=[alone_gen]).item())
        logits = torch.stack([torch.randn(VOCAB), row, torch.randn(VOCAB), torch.randn(VOCAB)])
        ids = sample(logits, [others[0], seeded, others[1], others[2]], prompt_ids=[[1], [], [2], [3, 4]],
                     generators=[None, batch_gen, make_generator(99, "cpu"), None])
        batched.append(ids[1].item())
    assert alone == batched
    assert len(set(alone)) > 1  # really sampling, not collapsing to one token


def test_different_seeds_give_different_samples():
    logits = torch.zeros(1, VOCAB)  # uniform
    params = SamplingParams(temperature=1.0)
    a = [sample(logits, [params], generators=[make_generator(s, "cpu")]).item() for s in range(100)]
    b = [sample(logits, [params], generators=[make_generator(s + 1000, "cpu")]).item() for s in range(100)]
    assert a != b
    assert len(set(a)) > VOCAB // 2  # and the seeds actually spread over the vocabulary


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05] + [0.0] * (VOCAB - 5)) + 1e-9
    logits = probs.log()
    # 0.5 + 0.3 = 0.8 < 0.85, so the nucleus needs the third token too.
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.85))
    assert set(counts) == {0, 1, 2}
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.45))
    assert set(counts) == {0}
    # renormalised within the nucleus {0, 1}: 0.5/0.8 = 0.625
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.7), n=4000)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 4000 - 0.625) < 0.04


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.arange(VOCAB, dtype=torch.float32) / 4  # token 31 is most likely
    counts = draws(logits, SamplingParams(temperature=1.0, top_k=3))
    assert set(counts) == {29, 30, 31}


def test_min_p_drops_tokens_below_fraction_of_top_probability():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1] + [0.05 / (VOCAB - 4)] * (VOCAB - 4))
    # threshold 0.3 * 0.4 = 0.12 keeps tokens 0, 1, 2
    counts = draws(probs.log(), SamplingParams(temperature=1.0, min_p=0.3))
    assert set(counts) == {0, 1, 2}


def test_unfiltered_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (VOCAB - 3))
    counts = draws(probs.log(), SamplingParams(temperature=1.0), n=4000)
    assert set(counts) == {0, 1, 2}
    assert abs(counts[0] / 4000 - 0.6) < 0.04 and abs(counts[2] / 4000 - 0.1) < 0.03


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0)
    out = Sampler.apply_penalties(logits.clone(), [params], [[0, 1]], [[1, 3]])
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 3.0, -2.0, 0.5]]))


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 0 only in the prompt: untouched; token 1 once, token 2 three times
    out = Sampler.apply_penalties(logits.clone(), [params], [[0, 0]], [[1, 2, 2, 2]])
    assert torch.allclose(out, torch.tensor([[1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75, 1.0]]))


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)  # 3 / 2 = 1.5 < 2
    assert sample(logits, [params], prompt_ids=[[0]]).item() == 1
    assert sample(logits, [SamplingParams(temperature=0.0)], prompt_ids=[[0]]).item() == 0
    assert logits[0, 0] == 3.0  # the caller's logits are not modified


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.5), dict(temperature=math.nan), dict(temperature=math.inf),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(stop=[""]),
])
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs).validate()


def test_defaults_and_greedy_are_valid():
    SamplingParams().validate()
    SamplingParams(temperature=0.0, top_k=0, stop=["\n"]).validate()
