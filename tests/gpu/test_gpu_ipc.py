"""cuda-ipc on one GPU: a prefill and a decode node on the same device, the prefill
ranks copying each layer into the decode node's reserved blocks through CUDA IPC
handles. Greedy float32 outputs equal transformers'; a corrupted copy, a stale ticket
and a decode node killed while transfers run all end with a status, free every block,
and leave the prefill node serving."""
from __future__ import annotations

import time

import grpc
import pytest
import torch

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference
from tests.test_cluster import workload
from tests.test_ipc_cluster import check_a_decode_killed_mid_transfer, check_a_stale_ticket_never_reaches_the_engine

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 1, reason="needs CUDA")


def pairs_open(log_dir, n: int = 1, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(p.read_text().count("open towards") for p in log_dir.glob("*-prefill.log")) < n:
        assert time.monotonic() < deadline, "the cuda-ipc pairs never opened"
        time.sleep(0.2)


def ipc_cluster(tiny_models, tmp_path, device: str = "cuda:0", **kw):
    cluster = start_cluster(model=tiny_models["qwen2"], device=device, dtype="float32", kv_blocks=256,
                            kv_transport="cuda-ipc", log_dir=str(tmp_path), **kw)
    pairs_open(tmp_path)
    return cluster


@pytest.mark.parametrize("device, graphs", [("cuda:0", True), ("cuda:0", False),
                                            pytest.param("cuda", True, marks=pytest.mark.skipif(
                                                GPUS != 1, reason="pdserve up's one-GPU layout needs one GPU"))])
def test_1p1d_over_cuda_ipc_on_one_gpu_matches_transformers(tiny_models, reference, tmp_path, device, graphs):
    """cuda:0: both nodes on GPU 0 as asked; cuda with one GPU: pdserve up shares it (the
    prefill node first, with its smaller memory share). The copies run behind the layer
    events whether the prefill step replays a CUDA graph or runs eagerly."""
    cluster = ipc_cluster(tiny_models, tmp_path, device=device, prefill_graphs=graphs)
    client = Client(cluster.cfg.listen)
    try:
        assert {n["kv_transport"] for n in client.status()["nodes"]} == {"cuda-ipc"}
        jobs = workload(23, 10)
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    ref = reference(tiny_models["qwen2"])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), f"cuda-ipc {device}")


def test_a_checksum_mismatch_fails_with_unavailable_and_frees_the_blocks(tiny_models, tmp_path):
    cluster = ipc_cluster(tiny_models, tmp_path, node_flags=("--kv-fault", "checksum"),
                          coordinator_flags=("--max-retries", "1"))
    client = Client(cluster.cfg.listen)
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(request(list(range(1, 60)), greedy(8, ignore_eos=True)), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "checksum mismatch" in e.value.details()
        client.wait_blocks_at_baseline()
        assert all(p.poll() is None for p in cluster.procs), "no node died of it"
    finally:
        client.close()
        cluster.stop()


def test_a_stale_ticket_never_writes_and_the_pair_keeps_serving(tiny_models, reference, tmp_path):
    """A Prefill whose ticket carries an epoch older than the decode node's (epoch 0: no
    registration has it) is refused with UNAVAILABLE before the prompt enters the engine."""
    cluster = ipc_cluster(tiny_models, tmp_path)
    client = Client(cluster.cfg.listen)
    try:
        check_a_stale_ticket_never_reaches_the_engine(client)
        ref = reference(tiny_models["qwen2"])
        for (prompt, n), out in zip(workload(5, 3), client.generate_all(workload(5, 3))):
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "after a stale ticket")
    finally:
        client.close()
        cluster.stop()


def test_a_decode_node_killed_mid_transfer_leaves_the_prefill_node_healthy(tiny_models, reference, tmp_path):
    """SIGKILL the decode node while long prompts are being prefilled and copied into it:
    every request ends with a status, the prefill node stays up (its CUDA context too),
    drops the dead node's handles, pairs with the restarted node and serves it."""
    cluster = ipc_cluster(tiny_models, tmp_path, coordinator_flags=("--max-retries", "1"))
    client = Client(cluster.cfg.listen)
    try:
        check_a_decode_killed_mid_transfer(cluster, client, tmp_path, reference(tiny_models["qwen2"]))
    finally:
        client.close()
        cluster.stop()
