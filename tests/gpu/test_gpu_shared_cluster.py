"""1 prefill + 1 decode node sharing one GPU, the KV over ZeroMQ: greedy outputs equal
transformers' in float32, and every KV block comes back."""
from __future__ import annotations

import pytest
import torch

from tests.cluster_util import Client, start_cluster
from tests.conftest import assert_matches_reference
from tests.test_cluster import workload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("layers_per_message", [1, 3])
def test_one_gpu_1p1d_over_zmq_matches_transformers(tiny_models, reference, layers_per_message):
    cluster = start_cluster(model=tiny_models["qwen2"], device="cuda:0", dtype="float32", kv_blocks=256,
                            node_flags=("--kv-layers-per-message", str(layers_per_message)))
    client = Client(cluster.cfg.listen)
    try:
        jobs = workload(11, 8)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    ref = reference(tiny_models["qwen2"])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "one-GPU 1P1D over zmq")
