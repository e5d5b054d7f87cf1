"""End to end: a coordinator and prefill/decode node processes on loopback, KV
shipped over ZeroMQ, outputs checked against transformers, resources against baseline."""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
import grpc
import pytest

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference


def workload(seed: int, n: int, vocab: int = 384):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 60))], rng.randint(1, 24)) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen3_cluster(tiny_models):
    cluster = start_cluster(model=tiny_models["qwen3"], kv_blocks=256)
    client = Client(cluster.cfg.listen)
    yield client
    client.close()
    cluster.stop()


def check_parity(model: str, ref, jobs, what: str, ready=None, **cluster_kw) -> None:
    """Greedy jobs through a fresh cluster equal the reference, every block comes back,
    and SIGTERM drains every member to exit 0. ready() runs before the jobs."""
    cluster = start_cluster(model=model, kv_blocks=128, **cluster_kw)
    members = list(cluster.procs)
    client = Client(cluster.cfg.listen)
    try:
        if ready is not None:
            ready()
        outs = client.generate_all(jobs)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    assert [p.returncode for p in members] == [0] * len(members), "SIGTERM must drain and exit 0"
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), what)


@pytest.mark.parametrize("family, p_tp, d_tp", [("qwen3", 1, 1), ("llama", 1, 2), ("qwen2", 2, 1), ("llama", 2, 2)])
def test_greedy_through_the_cluster_matches_transformers(tiny_models, reference, family, p_tp, d_tp):
    check_parity(tiny_models[family], reference(tiny_models[family]), workload(p_tp * 10 + d_tp, 6),
                 f"{family} {p_tp}:{d_tp}", prefill_tp=p_tp, decode_tp=d_tp)


def test_sixteen_concurrent_requests_of_mixed_lengths_are_all_correct(qwen3_cluster, tiny_models, reference):
    jobs = workload(99, 20)
    outs = qwen3_cluster.generate_all(jobs)
    ref = reference(tiny_models["qwen3"])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "concurrent")
    nodes = qwen3_cluster.wait_blocks_at_baseline()
    assert {n["role"] for n in nodes} == {"prefill", "decode"}


def test_a_stream_cancelled_midway_frees_kv_on_every_node(qwen3_cluster):
    stream = qwen3_cluster.stub.Generate(request(list(range(1, 30)), greedy(480, ignore_eos=True)), timeout=60)
    got = 0
    with pytest.raises(grpc.RpcError) as e:
        for resp in stream:
            got += len(resp.token_ids)
            if got >= 3:
                stream.cancel()
    assert e.value.code() == grpc.StatusCode.CANCELLED
    qwen3_cluster.wait_blocks_at_baseline()


def test_a_request_whose_deadline_passes_gets_deadline_exceeded_and_frees_kv(qwen3_cluster):
    with pytest.raises(grpc.RpcError) as e:
        qwen3_cluster.generate(request(list(range(1, 30)), greedy(480, ignore_eos=True)), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    qwen3_cluster.wait_blocks_at_baseline()


BAD = [
    (request([], greedy(4)), "empty"),
    (request([1, 2, 384], greedy(4)), "out of range"),
    (request([-5], greedy(4)), "out of range"),
    (request(list(range(1, 300)) * 2, greedy(4)), "context"),
    (request([1, 2], greedy(511)), "exceeds the context"),
    (request([1, 2], greedy(0)), "max_tokens"),
]


def bad_requests():
    from pdserve.v1 import api_pb2
    out = []
    for kwargs, message in [(dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                            (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"),
                            (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
                            (dict(repetition_penalty=0.0), "repetition_penalty"),
                            (dict(presence_penalty=3.0), "presence_penalty"), (dict(stop=[""]), "stop"),
                            (dict(stop_token_ids=[999]), "stop_token_ids")]:
        s = api_pb2.SamplingParams(max_tokens=4, **kwargs)
        out.append((request([1, 2], s), message))
    out += BAD
    no_sampling = api_pb2.GenerateRequest()
    no_sampling.token_ids.ids.extend([1, 2])
    out.append((no_sampling, "max_tokens"))
    not_utf8 = api_pb2.GenerateRequest(text=b"\xff\xfe bad", sampling=greedy(4))
    out.append((not_utf8, "this model has no tokenizer"))
    return out


def test_each_bad_input_gets_invalid_argument_and_leaves_concurrent_requests_alone(qwen3_cluster, tiny_models,
                                                                                   reference):
    good = [(list(range(3, 40)), 24), ([7, 7, 7], 20)]
    results = {}

    def run_good(i, job):
        results[i] = qwen3_cluster.generate(request(job[0], greedy(job[1], ignore_eos=True)))

    threads = [threading.Thread(target=run_good, args=(i, j)) for i, j in enumerate(good)]
    for t in threads:
        t.start()
    for req, message in bad_requests():
        with pytest.raises(grpc.RpcError) as e:
            out = qwen3_cluster.generate(req)
            pytest.fail(f"{message}: no error, got {out}")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, e.value.details())
        assert message in e.value.details(), (message, e.value.details())
    for t in threads:
        t.join()
    ref = reference(tiny_models["qwen3"])
    for i, (prompt, n) in enumerate(good):
        assert_matches_reference(results[i]["token_ids"], ref.generate(prompt, n), "good neighbour")
    qwen3_cluster.wait_blocks_at_baseline()


def test_unknown_model_name_is_not_found(qwen3_cluster):
    req = request([1, 2], greedy(2))
    req.model = "no-such-model"
    with pytest.raises(grpc.RpcError) as e:
        qwen3_cluster.generate(req)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_status_json_lists_nodes_with_their_kv_blocks(qwen3_cluster):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pdserve", "status", "--coordinator", qwen3_cluster.address, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    nodes = json.loads(r.stdout)["nodes"]
    assert sorted(n["role"] for n in nodes) == ["decode", "prefill"]
    for n in nodes:
        assert set(n) == {"id", "role", "address", "healthy", "tp", "kv_blocks_free", "kv_blocks_total", "running",
                          "queued", "kv_transport", "counters", "cached_blocks"}
        assert set(n["counters"]) >= {"prefix_query_tokens", "prefix_hit_tokens", "kv_bytes_sent"}
        assert n["kv_transport"] == "zmq"  # CPU nodes: auto picks zmq
        assert n["healthy"] and n["kv_blocks_total"] == 256 and n["address"].startswith("127.0.0.1:")


def test_a_node_that_stops_is_taken_out_of_rotation_and_requests_still_succeed(tiny_models, reference):
    cluster = start_cluster(model=tiny_models["qwen2"], decode=2, kv_blocks=64)
    client = Client(cluster.cfg.listen)
    try:
        victim = cluster.procs[-1]  # the second decode node
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        deadline = time.monotonic() + 15
        while sum(n["healthy"] for n in client.status()["nodes"] if n["role"] == "decode") != 1:
            assert time.monotonic() < deadline, "the dead node was never marked unhealthy"
            time.sleep(0.2)
        ref = reference(tiny_models["qwen2"])
        for prompt, n in workload(5, 4):
            out = client.generate(request(prompt, greedy(n, ignore_eos=True)))
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "after a node died")
    finally:
        client.close()
        cluster.stop()


def test_no_nodes_means_unavailable_and_a_full_queue_means_resource_exhausted(tiny_models):
    lonely = start_cluster(prefill=0, decode=0)
    client = Client(lonely.cfg.listen)
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(request([1, 2], greedy(2)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        lonely.stop()

    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, max_inflight=1,
                            coordinator_flags=("--max-queued", "0"))
    client = Client(cluster.cfg.listen)
    try:
        long = client.stub.Generate(request(list(range(1, 20)), greedy(480, ignore_eos=True)), timeout=60)
        next(long)  # admitted and streaming
        with pytest.raises(grpc.RpcError) as e:
            client.generate(request([1, 2], greedy(2)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        long.cancel()
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


@pytest.mark.parametrize("colocated", [False, True], ids=["1p1d", "colocated"])
def test_smollm2_chat_through_the_cluster_matches_transformers(smol_dir, tokenizer, reference, colocated):
    """Tokens and text: the node detokenizes off the engine's thread, except requests with
    stop strings, which the engine detokenizes (their end depends on the text)."""
    topology = dict(prefill=0, decode=0, colocated=1) if colocated else {}
    cluster = start_cluster(model=None, kv_blocks=128, **topology)  # the default model, converted once (smol_dir)
    client = Client(cluster.cfg.listen)
    chats = ["What is the capital of France?", "Name three colours of the rainbow."]
    try:
        outs = [client.generate(request(c, greedy(24), chat=True)) for c in chats]
        word = outs[1]["text"].split()[2]
        cut = client.generate(request(chats[1], greedy(24, stop=[word]), chat=True))
        assert cut["text"] == outs[1]["text"][:outs[1]["text"].index(word)] and cut["finish_reason"] == 1
        client.wait_blocks_at_baseline()
        assert client.status()["model"] == "SmolLM2-135M-Instruct"  # the default model has a name
        coordinator_maps = open(f"/proc/{cluster.procs[0].pid}/maps").read()
        assert "libtorch" not in coordinator_maps, "the coordinator process loaded torch"
    finally:
        client.close()
        cluster.stop()
    for chat, out in zip(chats, outs):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        assert_matches_reference(out["token_ids"], reference(smol_dir).generate(prompt, 24, stop_at_eos=True), chat)
        assert out["text"] == tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert "Paris" in outs[0]["text"]


def test_cli_generate_through_the_coordinator_keeps_the_json_contract_and_reports_failures(qwen3_cluster, tiny_models,
                                                                                          reference):
    import json
    import subprocess
    import sys
    base = [sys.executable, "-m", "pdserve", "generate", "--coordinator", qwen3_cluster.address]
    r = subprocess.run(base + ["--prompt-ids", "4,8,15,16,23,42", "--max-tokens", "7", "--ignore-eos", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_token_ids"] == [4, 8, 15, 16, 23, 42] and out["finish_reason"] == "length"
    assert_matches_reference(out["token_ids"], reference(tiny_models["qwen3"]).generate([4, 8, 15, 16, 23, 42], 7),
                             "cli")
    server = out["timings"]["server"]
    assert set(server) >= {"queue_s", "prefill_s", "transfer_s", "decode_admission_s", "ttft_s", "e2e_s"}
    assert all(v >= 0 for v in server.values()) and server["prefill_s"] > 0 and server["transfer_s"] > 0
    r = subprocess.run(base + ["--prompt-ids", "1,2", "--top-p", "7"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("INVALID_ARGUMENT: top_p")


def test_a_request_ended_by_its_first_token_releases_the_decode_reservation(qwen3_cluster):
    out = qwen3_cluster.generate(request([5, 6, 7], greedy(1, ignore_eos=True)))
    assert len(out["token_ids"]) == 1 and out["finish_reason"] == 2  # LENGTH
    qwen3_cluster.wait_blocks_at_baseline(timeout=5.0)  # well inside the 30 s lease


def test_servers_answer_the_standard_health_check_and_reflection(qwen3_cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    nodes = qwen3_cluster.status()["nodes"]
    for address in [qwen3_cluster.address] + [n["address"] for n in nodes]:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name for r in listing for s in r.list_services_response.service}
            assert "grpc.health.v1.Health" in names and any(n.startswith("pdserve.v1.") for n in names)


def test_a_colocated_cluster_serves_the_same_api_with_chunked_prefill(tiny_models, reference):
    """`pdserve up --colocated 1`: one node does prefill and decode in one batch (the
    goodput baseline); a 32-token budget makes longer prompts go in chunks beside decodes."""
    cluster = start_cluster(model=tiny_models["qwen3"], prefill=0, decode=0, colocated=1, kv_blocks=128,
                            max_num_batched_tokens=32)
    client = Client(cluster.cfg.listen)
    try:
        nodes = client.status()["nodes"]
        assert [n["role"] for n in nodes] == ["both"]
        jobs = workload(21, 10) + [([9, 8, 7], 1)]
        outs = client.generate_all(jobs)
        stream = client.stub.Generate(request(list(range(1, 30)), greedy(480, ignore_eos=True)), timeout=60)
        with pytest.raises(grpc.RpcError):
            for i, _ in enumerate(stream):
                if i == 2:
                    stream.cancel()
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    ref = reference(tiny_models["qwen3"])
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "colocated")


def test_pdserve_up_stops_every_member_on_ctrl_c(tiny_models):
    import subprocess
    import sys
    from pdserve.cluster import free_port
    up = subprocess.Popen([sys.executable, "-m", "pdserve", "up", "--model", tiny_models["qwen2"], "--kv-blocks", "32",
                           "--device", "cpu", "--listen", f"127.0.0.1:{free_port()}"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = up.stdout.readline()
        assert line.startswith("cluster ready"), line
        members = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == up.pid]
        assert len(members) == 3  # coordinator, prefill node, decode node
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        for pid in members:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def _parent(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_zeromq_decode_node_refuses_nccl_pairs(qwen3_cluster):
    from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
    from pdserve.v1 import node_pb2, node_pb2_grpc
    decode = next(n for n in qwen3_cluster.status()["nodes"] if n["role"] == "decode")
    with grpc.insecure_channel(decode["address"]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            node_pb2_grpc.DecodeNodeStub(ch).OpenKVPairs(node_pb2.KVPairsRequest(
                protocol_version=PROTOCOL_VERSION, prefill_node_id="p", prefill_tp=1, pair_set="p.1"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not nccl" in e.value.details()


def test_members_pinned_to_their_own_physical_cores():
    from pdserve.cluster import Cluster, ClusterConfig, member_cpus
    cores = [[0, 8], [1, 9], [2, 10], [3, 11]]  # SMT siblings stay together
    assert member_cpus(0, 2, cores) == {0, 8, 1, 9}
    assert member_cpus(1, 2, cores) == {2, 10, 3, 11}
    assert member_cpus(2, 3, cores) == {2, 10, 3, 11, 0, 8}  # cores 6, 7, 8: wrapped around
    cluster = Cluster(ClusterConfig(cores_per_member=1))
    child = cluster._spawn([sys.executable, "-c", "import threading, time; threading.Thread(target=time.sleep, "
                            "args=(30,)).start(); time.sleep(30)"])
    try:
        time.sleep(1.0)  # its second thread now exists
        want = member_cpus(0, 1)
        assert os.sched_getaffinity(child.pid) == want
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert len(tids) >= 2 and all(os.sched_getaffinity(int(t)) == want for t in tids)
    finally:
        child.kill()
        child.wait()


def test_members_run_with_a_short_thread_switch_interval():
    """Nodes and the coordinator hand work between threads (a KV control message queued as
    a prefill step starts waits for the engine thread's GIL): they switch at 200 us by
    default, not Python's 5 ms; a colocated node, which moves no KV, at 2 ms; a cluster
    passes its own value to every member."""
    from pdserve.cli import build_parser, set_switch_interval
    from pdserve.cluster import Cluster, ClusterConfig
    ap = build_parser()
    node = ap.parse_args(["node", "--role", "prefill", "--coordinator", "127.0.0.1:1"])
    coord = ap.parse_args(["coordinator", "--switch-interval-us", "350"])
    assert node.switch_interval_us is None and coord.switch_interval_us == 350.0
    before = sys.getswitchinterval()
    try:
        set_switch_interval(node)
        assert abs(sys.getswitchinterval() - 200e-6) < 2e-6  # Python keeps whole microseconds
        set_switch_interval(ap.parse_args(["decode", "--coordinator", "x"]))
        assert abs(sys.getswitchinterval() - 200e-6) < 2e-6
        set_switch_interval(ap.parse_args(["node", "--role", "both", "--coordinator", "x"]))
        assert abs(sys.getswitchinterval() - 2000e-6) < 2e-6
        set_switch_interval(ap.parse_args(["node", "--role", "both", "--coordinator", "x", "--switch-interval-us",
                                           "300"]))
        assert abs(sys.getswitchinterval() - 300e-6) < 2e-6
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(SystemExit):
        set_switch_interval(ap.parse_args(["decode", "--coordinator", "x", "--switch-interval-us", "0"]))
    cmds = Cluster(ClusterConfig(device="cpu", switch_interval_us=1000.0)).node_commands()
    assert cmds and all(c[c.index("--switch-interval-us") + 1] == "1000.0" for c in cmds)
    assert all("--switch-interval-us" not in c for c in Cluster(ClusterConfig(device="cpu")).node_commands())
