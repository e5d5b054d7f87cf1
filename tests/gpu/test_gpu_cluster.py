"""Clusters on several GPUs (skipped without them): 1 prefill + 1 decode with the KV
over ZeroMQ (greedy outputs equal transformers' in float32, and bfloat16 runs), and
with the KV over NCCL at P:D TP 1:1 (two GPUs), 1:2 and 2:1 (three GPUs)."""
from __future__ import annotations

import time

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


@pytest.mark.parametrize("family, p_tp, d_tp", [("qwen2", 1, 1), ("llama", 1, 2), ("qwen3", 2, 1)])
def test_nccl_cluster_matches_transformers(tiny_models, reference, family, p_tp, d_tp, tmp_path):
    """The KV moves GPU to GPU over NCCL, re-sliced across TP sizes (1:2 and 2:1 need three GPUs)."""
    if torch.cuda.device_count() < p_tp + d_tp:
        pytest.skip(f"needs {p_tp + d_tp} GPUs")
    cluster = start_cluster(model=tiny_models[family], device="cuda", dtype="float32", kv_blocks=256,
                            prefill_tp=p_tp, decode_tp=d_tp, kv_transport="nccl", log_dir=str(tmp_path))
    client = Client(cluster.cfg.listen)
    try:
        deadline = time.monotonic() + 60
        while "open towards" not in "".join(p.read_text() for p in tmp_path.glob("*-prefill.log")):
            assert time.monotonic() < deadline, "the NCCL pairs never opened"
            time.sleep(0.2)
        jobs = workload(13 + p_tp * 3 + d_tp, 10)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    ref = reference(tiny_models[family])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), f"nccl {family} {p_tp}:{d_tp}")
