"""End to end with --kv-transport cuda-ipc. Without GPUs the same transport runs over
host shared memory (the copy layer's CPU double, kv_transfer/cuda_ipc/export.py): pair
sets opened at registration, the decode ranks' pools exported once per pairing, a
write granted before the prompt enters the engine, the prefill ranks copying each layer
into the reserved blocks with per-layer checksums, head re-slicing across TP sizes;
tests/gpu/test_gpu_ipc.py runs it over CUDA IPC on one GPU."""
from __future__ import annotations

import os
import signal

import grpc
import pytest

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.test_cluster import check_parity, workload
from tests.conftest import assert_matches_reference
from tests.test_nccl_cluster import opened, serves_like_reference, wait_for


@pytest.mark.parametrize("family, p_tp, d_tp", [("qwen2", 1, 1), ("llama", 1, 2), ("qwen3", 2, 1)])
def test_greedy_through_a_cuda_ipc_cluster_matches_transformers(tiny_models, reference, family, p_tp, d_tp, tmp_path):
    check_parity(tiny_models[family], reference(tiny_models[family]), workload(p_tp * 10 + d_tp + 3, 8),
                 f"cuda-ipc {family} {p_tp}:{d_tp}",
                 ready=lambda: wait_for(lambda: opened(tmp_path) == 1, "the pair set to open at registration"),
                 prefill_tp=p_tp, decode_tp=d_tp, kv_transport="cuda-ipc", log_dir=str(tmp_path))


def test_a_checksum_mismatch_fails_the_request_with_unavailable_and_frees_the_blocks(tiny_models, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, kv_transport="cuda-ipc", log_dir=str(tmp_path),
                            node_flags=("--kv-fault", "checksum"), coordinator_flags=("--max-retries", "1"))
    client = Client(cluster.cfg.listen)
    try:
        wait_for(lambda: opened(tmp_path) == 1, "the pair set")
        assert {n["kv_transport"] for n in client.status()["nodes"]} == {"cuda-ipc"}
        with pytest.raises(grpc.RpcError) as e:
            client.generate(request(list(range(1, 40)), greedy(8, ignore_eos=True)), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "checksum mismatch (k" in e.value.details()
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_pairing_across_hosts_is_refused_and_a_restarted_decode_node_gets_new_handles(tiny_models, reference,
                                                                                     tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, kv_transport="cuda-ipc", log_dir=str(tmp_path))
    client = Client(cluster.cfg.listen)
    try:
        wait_for(lambda: opened(tmp_path) == 1, "the first pair set")
        check_another_host_is_refused(client)
        check_a_stale_ticket_never_reaches_the_engine(client)
        ref = reference(tiny_models["qwen2"])
        jobs = workload(17, 4)
        serves_like_reference(client, ref, jobs, "first decode node")

        decode_cmd = cluster.node_commands()[1]
        victim = cluster.procs[2]  # coordinator, prefill, decode
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        cluster._spawn(decode_cmd)
        wait_for(lambda: opened(tmp_path) == 2, "a new pair set towards the restarted decode node", 60)
        wait_for(lambda: sum(n["healthy"] for n in client.status()["nodes"] if n["role"] == "decode") == 1,
                 "the restarted decode node")
        serves_like_reference(client, ref, jobs, "after the decode node came back")
        assert cluster.procs[1].poll() is None, "the prefill node survived its peer's death"
    finally:
        client.close()
        cluster.stop()


def check_another_host_is_refused(client: Client) -> None:
    """OpenKVPairs from another host (or another transport) fails with a message that says why."""
    from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
    from pdserve.v1 import node_pb2, node_pb2_grpc
    decode = next(n for n in client.status()["nodes"] if n["role"] == "decode")
    compat = _decode_compat_hash(decode["address"])
    with grpc.insecure_channel(decode["address"]) as ch:
        stub = node_pb2_grpc.DecodeNodeStub(ch)
        for req, why in [(node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION, compat_hash=compat,
                                                  prefill_node_id="p", prefill_tp=1, pair_set="p.9",
                                                  kv_transport="cuda-ipc", host_id="elsewhere"), "one host"),
                         (node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION, compat_hash=compat,
                                                  prefill_node_id="p", prefill_tp=1, pair_set="p.9",
                                                  kv_transport="nccl"), "same --kv-transport")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.OpenKVPairs(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and why in e.value.details(), \
                e.value.details()



def _decode_compat_hash(address: str) -> str:
    """The decode node's compat hash, read from its refusal of a wrong one."""
    from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
    from pdserve.v1 import node_pb2, node_pb2_grpc
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            node_pb2_grpc.DecodeNodeStub(ch).OpenKVPairs(node_pb2.KVPairsRequest(
                protocol_version=PROTOCOL_VERSION, compat_hash="?", prefill_node_id="p", prefill_tp=1,
                pair_set="p.8", kv_transport="cuda-ipc"), timeout=10)
    return e.value.details().rsplit("this node has ", 1)[1].strip("'")


def check_a_stale_ticket_never_reaches_the_engine(client: Client) -> None:
    """A Prefill whose ticket carries an epoch older than the decode node's pairing (0: no
    registration has it) ends UNAVAILABLE before the prompt enters the engine; no block moves."""
    import time
    from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc
    nodes = client.status()["nodes"]
    prefill = next(n for n in nodes if n["role"] == "prefill")
    decode = next(n for n in nodes if n["role"] == "decode")
    ticket = node_pb2.Ticket(transfer_id="f" * 32, decode_node_id=decode["id"], epoch=0, block_ids=[1, 2],
                             lease_expiry=time.time() + 30, decode_tp=1)
    req = node_pb2.PrefillRequest(request_id="stale", prompt_token_ids=list(range(1, 20)),
                                  sampling=api_pb2.SamplingParams(max_tokens=4), ticket=ticket)
    with grpc.insecure_channel(prefill["address"]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            node_pb2_grpc.PrefillNodeStub(ch).Prefill(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "stale epoch 0" in e.value.details(), e.value.details()
    client.wait_blocks_at_baseline()


def test_pdserve_up_shares_one_gpu_between_prefill_and_decode_over_cuda_ipc(monkeypatch):
    """One GPU and 1P1D: both nodes on it, KV over cuda-ipc (auto), the prefill node first
    with its smaller memory share; what cannot share one GPU is refused, saying why."""
    import torch
    from pdserve.cli import build_parser
    from pdserve.cluster import Cluster, ClusterConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cluster = Cluster(ClusterConfig(device="cuda"))
    got = [build_parser().parse_args(cmd[3:]) for cmd in cluster.node_commands()]
    assert cluster.shared_gpu
    assert [(a.role, a.device, a.kv_transport, a.gpu_memory_utilization) for a in got] == [
        ("prefill", "cuda:0", "cuda-ipc", 0.3), ("decode", "cuda:0", "cuda-ipc", 0.9)]
    colocated = build_parser().parse_args(Cluster(ClusterConfig(device="cuda", prefill=0, decode=0, colocated=1))
                                          .node_commands()[0][3:])
    assert (colocated.device, colocated.kv_transport) == ("cuda:0", "zmq")
    for too_many in (dict(decode=2), dict(prefill_tp=2)):
        with pytest.raises(ValueError, match="not enough GPUs"):
            Cluster(ClusterConfig(device="cuda", **too_many)).node_commands()
    with pytest.raises(ValueError, match="NCCL cannot pair two nodes on one GPU"):
        Cluster(ClusterConfig(device="cuda", kv_transport="nccl")).node_commands()


def test_a_decode_node_killed_while_prompts_are_copied_leaves_the_prefill_node_serving(tiny_models, reference,
                                                                                      tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=256, kv_transport="cuda-ipc", log_dir=str(tmp_path),
                            coordinator_flags=("--max-retries", "1"))
    client = Client(cluster.cfg.listen)
    try:
        wait_for(lambda: opened(tmp_path) == 1, "the pair set")
        check_a_decode_killed_mid_transfer(cluster, client, tmp_path, reference(tiny_models["qwen2"]))
    finally:
        client.close()
        cluster.stop()


def check_a_decode_killed_mid_transfer(cluster, client: Client, log_dir, ref) -> None:
    """SIGKILL the decode node while prompts are prefilled and copied into it: every
    request ends with a status (served elsewhere it cannot be: UNAVAILABLE, or OK if it
    finished first), the prefill node stays up, drops the dead node's handles, pairs with
    the restarted node and serves it; every block comes back."""
    import threading
    import time
    codes: list = []

    def one(i: int) -> None:
        try:
            client.generate(request(list(range(1 + i, 200 + i)), greedy(32, ignore_eos=True)), timeout=90)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    decode_cmd = cluster.node_commands()[1]
    os.kill(cluster.procs[2].pid, signal.SIGKILL)   # coordinator, prefill, decode
    cluster.procs[2].wait()
    for t in threads:
        t.join(120)
    assert len(codes) == 12 and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert cluster.procs[1].poll() is None, "the prefill node survived"
    cluster._spawn(decode_cmd)
    wait_for(lambda: opened(log_dir) == 2, "a pair set towards the restarted decode node", 120)
    jobs = workload(29, 4)
    for (prompt, n), out in zip(jobs, client.generate_all(jobs)):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "after the decode node came back")
    client.wait_blocks_at_baseline()
