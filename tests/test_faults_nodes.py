"""Faults aimed at the members under load: a decode node dying or frozen mid-stream or
while requests wait for their KV, a prefill node frozen or killed, prefill queued past the lease, the
coordinator killed and restarted, client deadlines inside Reserve. Real processes
on loopback, faults by signal. Every request ends in tokens or a precise status,
and KV returns to baseline on every surviving node."""
from __future__ import annotations

import os
import signal
import time

import grpc

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.conftest import assert_matches_reference
from pdserve.v1 import node_pb2
from tests.fault_util import Frozen, StalledClient, pids_by_role, run_all, start_coordinator, submit, wait_until
from tests.metrics_util import settled, value


def jobs_of(seed: int, n: int, prompt_len: int = 20, max_tokens: int = 16):
    return [([(seed * 31 + i * 7 + j) % 384 for j in range(prompt_len)], max_tokens) for i in range(n)]


def check(outs, jobs, ref, what: str) -> None:
    failed = [o for o in outs if not isinstance(o, dict)]
    assert not failed, f"{what}: {len(failed)} failed, e.g. {failed[0].code()}: {failed[0].details()}"
    for (prompt, n), out in zip(jobs, outs):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), what)


def test_requests_waiting_for_kv_on_a_decode_node_that_dies_move_to_another_at_once(tiny_models, reference):
    """Prefill is held back (SIGSTOP) so that every request holds a reservation and no KV;
    one decode node is killed. Its requests must be re-reserved on the other one, not
    wait out the lease (60 s here, beyond the clients' 20 s deadline)."""
    cluster = start_cluster(model=tiny_models["qwen2"], decode=2, kv_blocks=128, heartbeat_interval_s=1.0,
                            coordinator_flags=("--lease", "60"))
    client = Client(cluster.cfg.listen)
    roles = pids_by_role(cluster)
    try:
        jobs = jobs_of(1, 6)
        with Frozen(roles["prefill"][0]):
            pending = submit(client, jobs, timeout=20)
            time.sleep(0.8)  # reserved on both decode nodes, waiting for prefill
            os.kill(roles["decode"][1], signal.SIGKILL)
            time.sleep(0.3)
        check(pending.result(), jobs, reference(tiny_models["qwen2"]), "after the decode node died")
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_a_frozen_then_killed_prefill_node_is_retried_on_the_other_and_then_forgotten(tiny_models, reference):
    cluster = start_cluster(model=tiny_models["qwen2"], prefill=2, kv_blocks=128,
                            coordinator_flags=("--node-expiry", "3"))
    client = Client(cluster.cfg.listen)
    victim = pids_by_role(cluster)["prefill"][0]
    ref = reference(tiny_models["qwen2"])
    try:
        jobs = jobs_of(2, 8)
        with Frozen(victim):  # some requests go to it, and hang there until it is fenced off
            check(run_all(client, jobs, timeout=20), jobs, ref, "around a frozen prefill node")
            os.kill(victim, signal.SIGKILL)
        jobs = jobs_of(3, 4)
        check(run_all(client, jobs, timeout=20), jobs, ref, "after the prefill node was killed")
        wait_until(lambda: len(client.status()["nodes"]) == 2, 20, "the dead node to leave `status`")
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_a_prefill_queued_past_the_lease_is_not_failed_for_time(tiny_models, reference):
    """The reservation's lease (1 s) passes while prefill is held back for 2 s; the
    coordinator renews it, and only the client's deadline (30 s) could end the request."""
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=128, heartbeat_interval_s=1.0,
                            coordinator_flags=("--lease", "1"))
    client = Client(cluster.cfg.listen)
    try:
        jobs = jobs_of(4, 3)
        with Frozen(pids_by_role(cluster)["prefill"][0]):
            pending = submit(client, jobs, timeout=30)
            time.sleep(2.0)
        check(pending.result(), jobs, reference(tiny_models["qwen2"]), "past the lease")
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_a_coordinator_crash_leaves_no_orphaned_work_on_the_nodes(tiny_models):
    """Reservations and running sequences of a coordinator that died are freed by the
    nodes (its token stream ended; they register with its successor under a new epoch),
    long before their 60 s lease."""
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, coordinator_flags=("--lease", "60"))
    client = Client(cluster.cfg.listen)
    roles = pids_by_role(cluster)
    successor = None
    try:
        running = submit(client, [(list(range(1, 20)), 480)] * 2, timeout=30)
        time.sleep(0.3)
        with Frozen(roles["prefill"][0]):
            waiting = submit(client, jobs_of(5, 4, prompt_len=100), timeout=30)
            time.sleep(0.5)
            os.kill(roles["coordinator"][0], signal.SIGKILL)
        assert all(isinstance(o, grpc.RpcError) for o in waiting.result())
        running.result()
        successor = start_coordinator(cluster.cfg.listen)
        wait_until(lambda: sum(n["healthy"] for n in client.status()["nodes"]) == 2, 30, "the nodes to rejoin")
        client.wait_blocks_at_baseline(timeout=20)
    finally:
        client.close()
        if successor is not None:
            successor.kill()
            successor.wait()
        cluster.stop()


def test_deadlines_that_expire_inside_reserve_strand_no_blocks(tiny_models):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, coordinator_flags=("--lease", "60"))
    client = Client(cluster.cfg.listen)
    try:
        busy = submit(client, jobs_of(6, 8, max_tokens=400), timeout=60)  # Reserve waits for engine steps
        time.sleep(0.3)
        prompt = [(i * 13) % 384 for i in range(450)]
        codes = set()
        for i in range(40):
            try:
                client.generate(request(prompt, greedy(8)), timeout=0.002 + 0.001 * (i % 28))
            except grpc.RpcError as e:
                codes.add(e.code())
        assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        assert all(isinstance(o, dict) for o in busy.result())
        client.wait_blocks_at_baseline(timeout=15)
        out = client.generate(request(prompt, greedy(8)))  # the node is not starved
        assert len(out["token_ids"]) == 8
    finally:
        client.close()
        cluster.stop()


def test_a_token_stream_nobody_reads_is_ended_and_the_requests_beside_it_go_on(tiny_models, reference, tmp_path):
    """A second subscriber of the decode node that never reads (raw HTTP/2) is cut off
    after --max-unread-batches, instead of queueing every step's tokens without end."""
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, log_dir=str(tmp_path),
                            node_flags=("--max-unread-batches", "16"))
    client = Client(cluster.cfg.listen)
    decode = next(n for n in client.status()["nodes"] if n["role"] == "decode")
    stalled = StalledClient(decode["address"], node_pb2.SubscribeRequest(), path="/pdserve.v1.DecodeNode/Subscribe")
    try:
        wait_until(lambda: stalled.received > 0, 30, "the stalled stream to open")
        jobs = jobs_of(7, 2, max_tokens=100)
        check(run_all(client, jobs), jobs, reference(tiny_models["qwen2"]), "beside a stalled subscriber")
        wait_until(lambda: "fell 16 token batches behind" in (tmp_path / "2-decode.log").read_text(), 20,
                   "the stalled subscriber to be cut off")
        client.wait_blocks_at_baseline()
    finally:
        stalled.close()
        client.close()
        cluster.stop()


def pid_listening(port: int, pids: list[int]) -> int | None:
    """Which of pids has a socket listening on 127.0.0.1:port (from /proc, no tools needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":  # LISTEN
                inodes.add(f[9])
    for pid in pids:
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if any(f"socket:[{i}]" in links for i in inodes):
            return pid
    return None


def stream_with_fault(client: Client, cluster, prompt: list[int], n: int, fault) -> tuple[list[int], int | None]:
    """Stream a greedy request, checking its indexes; once 3 tokens came, fault(pid) hits the
    process of the decode node running it. Returns the tokens and that pid (None if never hit)."""
    tokens, hit = [], None
    for resp in client.stub.Generate(request(prompt, greedy(n, ignore_eos=True)), timeout=120):
        if resp.token_ids:
            assert resp.index == len(tokens), f"index {resp.index} after {len(tokens)} tokens"
        tokens.extend(resp.token_ids)
        if hit is None and len(tokens) >= 3:
            deadline = time.monotonic() + 2
            busy = []
            while not busy and time.monotonic() < deadline:
                busy = [d for d in client.status()["nodes"] if d["role"] == "decode" and d["running"]]
                time.sleep(0.02)
            assert busy, "no decode node reported the request running"
            hit = pid_listening(int(busy[0]["address"].rsplit(":", 1)[1]), [p.pid for p in cluster.procs])
            fault(hit)
            assert len(tokens) < n, "the request had to be running when its node was hit"
    return tokens, hit


def test_a_request_whose_decode_node_dies_midstream_continues_on_another_without_losing_a_token(tiny_models,
                                                                                               reference, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], decode=2, kv_blocks=128, log_dir=str(tmp_path), metrics=True)
    client = Client(cluster.cfg.listen)
    try:
        prompt, n = list(range(3, 23)), 480
        tokens, killed = stream_with_fault(client, cluster, prompt, n, lambda pid: os.kill(pid, signal.SIGKILL))
        assert killed is not None, "the request had to be running when its node died"
        ref = reference(tiny_models["qwen2"])
        assert_matches_reference(tokens, ref.generate(prompt, n), "across a decode node's death")
        assert "moves off decode node" in (tmp_path / "0-coordinator.log").read_text()
        client.wait_blocks_at_baseline()
        m = settled(cluster.metrics["coordinator"], n)  # one migration, every token counted once
        assert value(m, "pdserve:migrations_total") == 1 and value(m, "pdserve:generation_tokens_total") == n
        assert value(m, "pdserve:request_success_total", finished_reason="length") == 1
        assert value(m, "pdserve:num_requests_running") == 0 and value(m, "pdserve:nodes", role="decode",
                                                                       live="true") == 1
    finally:
        client.close()
        cluster.stop()


def test_a_request_on_a_frozen_decode_node_moves_on_and_the_node_is_fenced_off_when_it_wakes(tiny_models,
                                                                                           reference, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], decode=2, kv_blocks=128, log_dir=str(tmp_path))
    client = Client(cluster.cfg.listen)
    frozen = []
    try:
        prompt, n = list(range(5, 25)), 480
        tokens, _ = stream_with_fault(client, cluster, prompt, n,
                                      lambda pid: (frozen.append(pid), os.kill(pid, signal.SIGSTOP)))
        assert "missed its heartbeats" in (tmp_path / "0-coordinator.log").read_text()
        ref = reference(tiny_models["qwen2"])
        assert_matches_reference(tokens, ref.generate(prompt, n), "across a frozen decode node")
        os.kill(frozen.pop(), signal.SIGCONT)
        deadline = time.monotonic() + 20  # awake again: it heartbeats, and the abort frees its blocks
        while sum(d["healthy"] for d in client.status()["nodes"] if d["role"] == "decode") < 2:
            assert time.monotonic() < deadline, "the woken node never came back"
            time.sleep(0.2)
        client.wait_blocks_at_baseline(timeout=30)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        client.close()
        cluster.stop()
