"""Clusters on GPUs: 1 prefill + 1 decode with the KV over ZeroMQ, on one shared GPU and
on two (greedy outputs equal transformers' in float32, within bf16 rounding of them in bfloat16), over ZeroMQ
at P:D TP 2:1 and 1:2 (three GPUs), and with the KV over NCCL at P:D TP 1:1 (two GPUs),
1:2 and 2:1 (three GPUs)."""
from __future__ import annotations

import time

import pytest
import torch

from tests.cluster_util import Client, start_cluster
from tests.conftest import assert_matches_reference, assert_near_greedy
from tests.test_cluster import workload

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")


one_gpu = pytest.mark.skipif(GPUS < 1, reason="needs CUDA")


@pytest.mark.parametrize("device, dtype, layers_per_message, graphs", [
    pytest.param("cuda:0", "float32", 1, True, marks=one_gpu), pytest.param("cuda:0", "float32", 3, False, marks=one_gpu),
    pytest.param("cuda", "float32", 1, True, marks=two_gpus), pytest.param("cuda", "bfloat16", 1, True, marks=two_gpus)])
def test_1p1d_over_zmq(tiny_models, reference, device, dtype, layers_per_message, graphs):
    """cuda:0: both nodes share one GPU; cuda: one GPU each. The KV streams from the prefill
    step, whether it replays a prefill graph or runs eagerly (graphs False)."""
    cluster = start_cluster(model=tiny_models["qwen2"], device=device, dtype=dtype, kv_blocks=256,
                            prefill_graphs=graphs, kv_transport="zmq",
                            node_flags=("--kv-layers-per-message", str(layers_per_message)))
    client = Client(cluster.cfg.listen)
    try:
        jobs = workload(11, 8)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    assert [len(o["token_ids"]) for o in outs] == [n for _, n in jobs]
    ref = reference(tiny_models["qwen2"])
    for (prompt, n), out in zip(jobs, outs):
        if dtype == "float32":
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "gpu cluster")
        else:  # bf16 rounding tips near-ties either way: every token near the float32 greedy one
            assert_near_greedy(ref, prompt, out["token_ids"], "gpu cluster bf16")


@two_gpus
@pytest.mark.parametrize("family, p_tp, d_tp", [("qwen3", 2, 1), ("llama", 1, 2), ("llama", 2, 2)])
def test_zmq_cluster_across_tp_sizes(tiny_models, reference, family, p_tp, d_tp):
    """Prefill TP 2 streams each layer from its step (the ranks gather it over NCCL on a side
    stream); decode TP 2 applies the received layers on every rank in one batch per step."""
    if torch.cuda.device_count() < p_tp + d_tp:
        pytest.skip(f"needs {p_tp + d_tp} GPUs")
    cluster = start_cluster(model=tiny_models[family], device="cuda", dtype="float32", kv_blocks=256,
                            prefill_tp=p_tp, decode_tp=d_tp)
    client = Client(cluster.cfg.listen)
    try:
        jobs = workload(17 + p_tp * 3 + d_tp, 10)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    ref = reference(tiny_models[family])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), f"zmq {p_tp}:{d_tp}")


@two_gpus
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
