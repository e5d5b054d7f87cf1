"""`pdserve coordinator --workers 2`: two frontend processes on one port, a supervisor
that owns the registry. Requests through either worker behave as through one
coordinator (greedy parity, contiguous indexes, cancel, deadline, bad inputs,
migration off a dead decode node); a killed worker is started again, its clients get
UNAVAILABLE while the other's finish, and the nodes free its requests' KV. Each
client below has its own TCP connection, which the kernel gives to either worker."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference
from tests.fault_util import pids_by_role, run_all, wait_until
from tests.test_cluster import bad_requests


def jobs_of(seed: int, n: int, max_tokens: int = 16):
    return [([(seed * 31 + i * 7 + j) % 384 for j in range(12 + i % 9)], max_tokens) for i in range(n)]


def clients(address: str, n: int) -> list[Client]:
    return [Client(address, own_connection=True) for _ in range(n)]


def spread(address: str, jobs, timeout: float = 60.0) -> list:
    """The jobs at once, one connection each; each result is its output dict or its grpc.RpcError."""
    conns = clients(address, len(jobs))
    out = [None] * len(jobs)

    def one(i):
        out[i] = run_all(conns[i], [jobs[i]], timeout)[0]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return out


def check(outs, jobs, ref, what: str) -> None:
    failed = [o for o in outs if not isinstance(o, dict)]
    assert not failed, f"{what}: {len(failed)} failed, e.g. {failed[0].code()}: {failed[0].details()}"
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), what)


def all_healthy(client: Client, nodes: int) -> bool:
    s = client.status()
    return sum(n["healthy"] for n in s["nodes"]) == nodes and all(w["ready"] for w in s["workers"])


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers-logs")
    c = start_cluster(model=tiny_models["qwen2"], decode=2, kv_blocks=256, workers=2, log_dir=str(logs))
    c.logs = logs
    client = Client(c.cfg.listen)
    yield c, client
    client.close()
    c.stop()


def test_greedy_requests_through_both_workers_match_transformers(cluster, tiny_models, reference):
    c, client = cluster
    status = client.status()
    assert len(status["workers"]) == 2 and len({w["pid"] for w in status["workers"]}) == 2
    jobs = jobs_of(1, 16)
    check(spread(c.cfg.listen, jobs), jobs, reference(tiny_models["qwen2"]), "through 2 workers")
    wait_until(lambda: all(w["served"] > 0 for w in client.status()["workers"]), 10, "both workers to serve")
    client.wait_blocks_at_baseline()


def test_cancel_deadline_and_bad_inputs_through_every_worker(cluster):
    c, client = cluster
    served = lambda: [w["served"] for w in client.status()["workers"]]  # noqa: E731
    before, conns = served(), []
    try:
        # new connections until both workers have served some of them
        while True:
            conn = Client(c.cfg.listen, own_connection=True)
            conns.append(conn)
            stream = conn.stub.Generate(request(list(range(1, 30)), greedy(480, ignore_eos=True)), timeout=60)
            got = 0
            with pytest.raises(grpc.RpcError) as e:
                for resp in stream:
                    got += len(resp.token_ids)
                    if got >= 3:
                        stream.cancel()
            assert e.value.code() == grpc.StatusCode.CANCELLED
            with pytest.raises(grpc.RpcError) as e:
                conn.generate(request(list(range(1, 30)), greedy(480, ignore_eos=True)), timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if len(conns) >= 4:
                time.sleep(0.6)  # a worker reports its counters twice per second
                if all(now > then for now, then in zip(served(), before)):
                    break
            assert len(conns) < 16, "the kernel never gave a connection to one of the workers"
        for i, (req, message) in enumerate(bad_requests()):
            with pytest.raises(grpc.RpcError) as e:
                conns[i % len(conns)].generate(req)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, e.value.details())
            assert message in e.value.details(), (message, e.value.details())
        client.wait_blocks_at_baseline()
    finally:
        for conn in conns:
            conn.close()


def test_streams_on_a_decode_node_that_dies_move_to_the_other_through_both_workers(cluster, tiny_models, reference):
    c, client = cluster
    jobs = jobs_of(2, 6, max_tokens=400)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("outs", spread(c.cfg.listen, jobs, timeout=120)))
    runner.start()
    busy = wait_until(lambda: [n for n in client.status()["nodes"] if n["role"] == "decode" and n["running"] >= 2],
                      30, "requests running on a decode node")
    victim = next(pid for pid in pids_by_role(c)["decode"] if _listens(pid, busy[0]["address"]))
    os.kill(victim, signal.SIGKILL)
    runner.join()
    check(result["outs"], jobs, reference(tiny_models["qwen2"]), "across a decode node's death")
    assert "moves off decode node" in (c.logs / "0-coordinator.log").read_text()
    client.wait_blocks_at_baseline()


def _listens(pid: int, address: str) -> bool:
    from tests.test_faults_nodes import pid_listening
    return pid_listening(int(address.rsplit(":", 1)[1]), [pid]) == pid


def test_a_killed_worker_is_started_again_and_only_its_clients_fail(tiny_models, reference):
    c = start_cluster(model=tiny_models["qwen2"], prefill=0, decode=0, colocated=1, kv_blocks=512, workers=2)
    client = Client(c.cfg.listen)
    conns, outs, threads = [], [], []
    try:
        prompt = list(range(2, 22))

        def one(conn, slot):
            try:
                outs[slot] = conn.generate(request(prompt, greedy(480, ignore_eos=True)), timeout=120)
            except grpc.RpcError as e:
                outs[slot] = e
        # long streams over new connections until both workers hold some
        while not all(w["inflight"] > 0 for w in client.status()["workers"]):
            assert len(conns) < 24, "the kernel never gave a connection to the second worker"
            conns.append(Client(c.cfg.listen, own_connection=True))
            outs.append(None)
            threads.append(threading.Thread(target=one, args=(conns[-1], len(conns) - 1)))
            threads[-1].start()
            time.sleep(0.3)
        victim = client.status()["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        for t in threads:
            t.join()
        failed = [o for o in outs if isinstance(o, grpc.RpcError)]
        assert failed and all(o.code() == grpc.StatusCode.UNAVAILABLE for o in failed), failed
        ref = reference(tiny_models["qwen2"])
        finished = [o for o in outs if isinstance(o, dict)]
        assert finished, "the other worker's streams had to finish"
        for out in finished:
            assert_matches_reference(out["token_ids"], ref.generate(prompt, 480), "beside a killed worker")
        wait_until(lambda: all_healthy(client, 1), 30, "the worker to be started again")
        restarted = client.status()["workers"][0]
        assert restarted["restarts"] >= 1 and restarted["pid"] != victim["pid"]
        client.wait_blocks_at_baseline()  # the node freed the dead worker's requests
        jobs = jobs_of(3, 8)
        check(spread(c.cfg.listen, jobs), jobs, ref, "after the restart")
        client.wait_blocks_at_baseline()
    finally:
        for conn in conns:
            conn.close()
        client.close()
        supervisor = c.procs[0]
        c.stop()
    assert supervisor.returncode == 0, "SIGTERM must drain the workers and exit 0"


def test_workers_default_from_the_cores_and_pass_through_pdserve_up():
    from pdserve.cli import build_parser
    from pdserve.cluster import Cluster, ClusterConfig
    from pdserve.common.config import CoordinatorConfig
    from pdserve.common.flags import from_args
    cores = len(os.sched_getaffinity(0))
    assert CoordinatorConfig().worker_count() == max(1, min(8, cores // 2))
    assert from_args(CoordinatorConfig, build_parser().parse_args(["coordinator", "--workers", "3"])).worker_count() == 3
    with pytest.raises(ValueError):
        CoordinatorConfig(workers=0)
    cmd = Cluster(ClusterConfig(workers=3)).coordinator_command()
    assert cmd[cmd.index("--workers") + 1] == "3"
    assert "--workers" not in Cluster(ClusterConfig()).coordinator_command()
