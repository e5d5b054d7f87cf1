"""End to end with --kv-transport nccl. Without GPUs the same transport runs over
gloo: pair sets opened at registration, sends issued by the prefill step layer
group by layer group, receives posted in announce order, head re-slicing across TP
sizes, checksums; tests/gpu/test_gpu_cluster.py runs it over NCCL on two GPUs."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference
from tests.test_cluster import check_parity, workload


def opened(log_dir: Path) -> int:
    """Pair sets the prefill node reported open."""
    return sum(p.read_text().count("open towards") for p in log_dir.glob("*-prefill.log"))


def serves_like_reference(client: Client, ref, jobs, what: str) -> None:
    """Every job's greedy output equals the reference's, and the KV blocks are all free after."""
    for (prompt, n), out in zip(jobs, client.generate_all(jobs)):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), what)
    client.wait_blocks_at_baseline()


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("family, p_tp, d_tp", [("qwen3", 1, 1), ("llama", 1, 2), ("qwen2", 2, 1)])
def test_greedy_through_an_nccl_cluster_matches_transformers(tiny_models, reference, family, p_tp, d_tp, tmp_path):
    check_parity(tiny_models[family], reference(tiny_models[family]), workload(p_tp * 10 + d_tp + 7, 8),
                 f"nccl {family} {p_tp}:{d_tp}",
                 ready=lambda: wait_for(lambda: opened(tmp_path) == 1, "the pair set to open at registration"),
                 prefill_tp=p_tp, decode_tp=d_tp, kv_transport="nccl", log_dir=str(tmp_path))


def test_a_cancelled_stream_frees_kv_and_restarted_nodes_get_new_pairs(tiny_models, reference, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, kv_transport="nccl", log_dir=str(tmp_path))
    client = Client(cluster.cfg.listen)
    try:
        wait_for(lambda: opened(tmp_path) == 1, "the first pair set")
        check_the_pair_handshake_refuses_mismatches(client)
        stream = client.stub.Generate(request(list(range(1, 30)), greedy(200, ignore_eos=True)), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            for i, _ in enumerate(stream):
                if i == 2:
                    stream.cancel()
        assert e.value.code() == grpc.StatusCode.CANCELLED
        client.wait_blocks_at_baseline()

        decode_cmd = cluster.node_commands()[1]
        victim = cluster.procs[2]  # coordinator, prefill, decode
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        cluster._spawn(decode_cmd)
        wait_for(lambda: opened(tmp_path) == 2, "a new pair set towards the restarted decode node", 60)
        wait_for(lambda: sum(n["healthy"] for n in client.status()["nodes"] if n["role"] == "decode") == 1,
                 "the restarted decode node")
        ref = reference(tiny_models["qwen2"])
        jobs = workload(31, 4)
        serves_like_reference(client, ref, jobs, "after the decode node came back")

        # a prefill node that goes away: the decode node closes its pair set; its successor gets a new one
        prefill_cmd = cluster.node_commands()[0]
        os.kill(cluster.procs[1].pid, signal.SIGKILL)
        cluster.procs[1].wait()
        cluster._spawn(prefill_cmd)
        wait_for(lambda: "left" in "".join(p.read_text() for p in tmp_path.glob("*-decode.log")),
                 "the decode node to close the departed prefill node's pairs", 60)
        wait_for(lambda: opened(tmp_path) == 3, "a pair set from the new prefill node", 60)
        serves_like_reference(client, ref, jobs, "after the prefill node came back")
    finally:
        client.close()
        cluster.stop()


def check_the_pair_handshake_refuses_mismatches(client: Client) -> None:
    """OpenKVPairs checks the protocol version and the compat hash before anything else."""
    from pdserve.v1 import node_pb2, node_pb2_grpc
    from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
    decode = next(n for n in client.status()["nodes"] if n["role"] == "decode")
    with grpc.insecure_channel(decode["address"]) as ch:
        stub = node_pb2_grpc.DecodeNodeStub(ch)
        for req, why in [(node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION + 1, compat_hash="x",
                                                  prefill_node_id="p", prefill_tp=1, pair_set="p.1"), "version"),
                         (node_pb2.KVPairsRequest(protocol_version=PROTOCOL_VERSION, compat_hash="not-this-model",
                                                  prefill_node_id="p", prefill_tp=1, pair_set="p.1"), "compat_hash")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.OpenKVPairs(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and why in e.value.details()


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_decode_rank_that_stalls_mid_transfer_fails_the_request_and_the_pairs_are_rebuilt(tiny_models, reference,
                                                                                            tmp_path):
    """Decode TP 2 with its second rank stopped (SIGSTOP): the prefill side's send to it
    times out, the request fails with UNAVAILABLE instead of hanging, and once the rank
    runs again every block is freed and new pairs carry requests again."""
    cluster = start_cluster(model=tiny_models["qwen2"], decode_tp=2, kv_blocks=64, kv_transport="nccl",
                            kv_timeout_s=3.0, log_dir=str(tmp_path))
    client = Client(cluster.cfg.listen)
    try:
        wait_for(lambda: opened(tmp_path) == 1, "the first pair set")
        rank1 = children(cluster.procs[2].pid)
        assert len(rank1) == 1, f"one TP rank process under the decode node, found {rank1}"
        os.kill(rank1[0], signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                client.generate(request(list(range(1, 40)), greedy(8, ignore_eos=True)), timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "KV transfer" in e.value.details()
            assert time.monotonic() - started < 30, "the timeout, not the lease, ended it"
        finally:
            os.kill(rank1[0], signal.SIGCONT)
        client.wait_blocks_at_baseline(timeout=60)
        wait_for(lambda: opened(tmp_path) >= 2, "a new pair set after the aborted one", 90)
        ref = reference(tiny_models["qwen2"])
        jobs = workload(41, 4)
        serves_like_reference(client, ref, jobs, "after the pairs were rebuilt")
    finally:
        client.close()
        cluster.stop()
