"""`pdserve bench --dataset-name prefix-repetition | multi-turn` against a real local
cluster: the requests have the shapes asked for and the nodes' hit rate is reported."""
from __future__ import annotations

import pytest

from tests.cluster_util import start_cluster
from tests.test_bench import bench


@pytest.fixture(scope="module")
def cluster(tiny_models):
    c = start_cluster(model=tiny_models["qwen3"], kv_blocks=256)
    yield c
    c.stop()


def test_prefix_repetition_requests_share_their_prefixes_and_hit_the_cache(cluster, tmp_path):
    s = bench(cluster, tmp_path, "--dataset-name", "prefix-repetition", "--num-prompts", "12",
              "--prefix-repetition-prefix-len", "48", "--prefix-repetition-suffix-len", "8",
              "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "4", "--request-rate", "20",
              "--max-concurrency", "1")  # one at a time: each prefix's first request is cached before the next
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["input_lens"] == [56] * 12 and s["output_lens"] == [4] * 12
    prefill = s["prefix_cache"]["prefill"]
    assert prefill["query_tokens"] == 12 * 56
    assert prefill["hit_tokens"] >= 10 * 48 and prefill["hit_rate"] > 0.5, prefill  # all but each prefix's first
    assert s["prefix_cache"]["decode"]["hit_tokens"] > 0


def test_multi_turn_resends_the_history_with_the_answers(cluster, tmp_path):
    s = bench(cluster, tmp_path, "--dataset-name", "multi-turn", "--num-prompts", "2", "--multi-turn-turns", "3",
              "--multi-turn-user-len", "20", "--multi-turn-output-len", "5")
    assert s["completed"] == 6 and s["failed"] == 0
    assert sorted(s["input_lens"]) == [20, 20, 45, 45, 70, 70]
    assert s["prefix_cache"]["prefill"]["hit_tokens"] >= 2 * (16 + 32)  # turns 2 and 3 find the earlier turns' blocks
