"""A 1 prefill + 1 decode cluster on two GPUs with the KV over ZeroMQ (skipped
without two GPUs): greedy outputs equal transformers' in float32, and bfloat16 runs."""
from __future__ import annotations

import pytest
import torch

from tests.cluster_util import Client, start_cluster
from tests.conftest import assert_matches_reference
from tests.test_cluster import workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two GPUs")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_gpu_cluster_over_zmq(tiny_models, reference, dtype):
    cluster = start_cluster(model=tiny_models["qwen2"], device="cuda", dtype=dtype, kv_blocks=256)
    client = Client(cluster.cfg.listen)
    try:
        jobs = workload(11, 8)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    assert [len(o["token_ids"]) for o in outs] == [n for _, n in jobs]
    if dtype == "float32":
        ref = reference(tiny_models["qwen2"])
        for (prompt, n), out in zip(jobs, outs):
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "gpu cluster")
