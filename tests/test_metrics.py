"""Prometheus metrics: after a known run through a coordinator with 2 workers, its
/metrics (the sum over both workers) and each node's counts, token counts, histogram
counts and TTFT phase split match what the run did; failures are counted by status."""
from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.common.phases import decode_admission_s, ttft_phases
from pdserve.node.metrics import failure_reason
from pdserve.v1 import api_pb2
from tests.cluster_util import Client, greedy, request, start_cluster
from tests.fault_util import wait_until
from tests.metrics_util import scrape, settled, value
from tests.test_coordinator_workers import spread

BLOCK = 16
BLOCK_BYTES = 2 * BLOCK * 2 * 16 * 4 * 2  # K and V, 16 tokens, 2 KV heads of 16 dims, float32, 2 layers (tiny qwen2)


@pytest.fixture(scope="module")
def cluster(tiny_models):
    c = start_cluster(model=tiny_models["qwen2"], prefill=1, decode=1, kv_blocks=256, workers=2, metrics=True)
    yield c
    c.stop()


def test_metrics_after_a_known_run_match_it_across_two_workers_and_the_nodes(cluster):
    jobs = [([(i * 13 + j) % 384 for j in range(10 + 3 * i)], 6 + i) for i in range(10)]
    client = Client(cluster.cfg.listen)
    try:
        outs = spread(cluster.cfg.listen, jobs)
        assert all(isinstance(o, dict) and len(o["token_ids"]) == n for o, (_, n) in zip(outs, jobs)), outs
        wait_until(lambda: all(w["served"] > 0 for w in client.status()["workers"]), 10, "both workers to serve")
        client.wait_blocks_at_baseline()
    finally:
        client.close()
    n, prompt_tokens, generated = len(jobs), sum(len(p) for p, _ in jobs), sum(t for _, t in jobs)

    m = settled(cluster.metrics["coordinator"], generated)
    assert value(m, "pdserve:request_success_total", finished_reason="length") == n
    assert value(m, "pdserve:prompt_tokens_total") == prompt_tokens
    assert value(m, "pdserve:generation_tokens_total") == generated
    assert value(m, "pdserve:time_to_first_token_seconds_count") == n
    assert value(m, "pdserve:e2e_request_latency_seconds_count") == n
    assert value(m, "pdserve:request_queue_time_seconds_count") == n
    assert value(m, "pdserve:inter_token_latency_seconds_count") == generated - n  # one gap per later token
    itl_buckets = {k: v for k, v in m["pdserve:inter_token_latency_seconds_bucket"].items()}
    assert max(itl_buckets.values()) == generated - n  # the +Inf bucket holds them all
    ttft_sum = value(m, "pdserve:time_to_first_token_seconds_sum")
    phases = {p: value(m, "pdserve:ttft_phase_seconds_sum", phase=p) for p in ("queue", "prefill", "transfer",
                                                                               "admission")}
    for p in phases:
        assert value(m, "pdserve:ttft_phase_seconds_count", phase=p) == n
    assert sum(phases.values()) == pytest.approx(ttft_sum, rel=1e-6, abs=1e-6)
    assert phases["prefill"] > 0 and ttft_sum > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "num_requests_prefilling",
                  "num_requests_waiting_admission", "num_requests_decoding", "num_requests_waiting_reservation"):
        assert value(m, f"pdserve:{gauge}") == 0, gauge
    assert value(m, "pdserve:nodes", role="prefill", live="true") == 1
    assert value(m, "pdserve:nodes", role="decode", live="true") == 1
    assert value(m, "pdserve:migrations_total") == 0

    blocks = sum(-(-len(p) // BLOCK) for p, _ in jobs)
    pre, dec = scrape(cluster.metrics["prefill-0"]), scrape(cluster.metrics["decode-0"])
    for node, direction in ((pre, "sent"), (dec, "received")):
        assert value(node, "pdserve:kv_transfers_total", transport="zmq", direction=direction) == n
        assert value(node, "pdserve:kv_transfer_bytes_total", transport="zmq", direction=direction) \
            == blocks * BLOCK_BYTES
        assert value(node, "pdserve:kv_cache_usage_perc") == 0.0
        assert value(node, "pdserve:num_requests_running") == 0
        assert value(node, "pdserve:num_requests_in_transfer") == 0
        assert not node.get("pdserve:kv_transfer_failures_total")
    assert value(pre, "pdserve:kv_transfer_seconds_count", transport="zmq") == n
    assert value(pre, "pdserve:prompt_tokens_total") == prompt_tokens
    assert value(pre, "pdserve:generation_tokens_total") == n  # each request's first token
    assert value(dec, "pdserve:generation_tokens_total") == generated - n
    assert value(dec, "pdserve:prompt_tokens_total") == 0


def test_a_request_in_flight_shows_in_the_gauges_and_usage(cluster):
    """A long request, read while it decodes: one running on the coordinator and the decode node."""
    client = Client(cluster.cfg.listen)
    try:
        stream = client.stub.Generate(request(list(range(40)), greedy(300, ignore_eos=True)), timeout=60)
        next(stream)  # the first token: prefilled and transferred
        m = wait_until(lambda: (lambda m: m if value(m, "pdserve:num_requests_decoding") == 1 else None)(
            scrape(cluster.metrics["coordinator"])), 10, "the request to decode")
        assert value(m, "pdserve:num_requests_running") == 1 and value(m, "pdserve:num_requests_waiting") == 0
        dec = scrape(cluster.metrics["decode-0"])
        assert value(dec, "pdserve:num_requests_running") == 1
        assert value(dec, "pdserve:kv_cache_usage_perc") > 0
        stream.cancel()
        wait_until(lambda: value(scrape(cluster.metrics["coordinator"]), "pdserve:num_requests_running") == 0, 10,
                   "the cancelled request to leave the gauges")
        assert value(scrape(cluster.metrics["coordinator"]), "pdserve:request_success_total",
                     finished_reason="abort") >= 1
        client.wait_blocks_at_baseline()
    finally:
        client.close()


def test_failed_requests_are_counted_by_status(cluster):
    before = scrape(cluster.metrics["coordinator"])
    client = Client(cluster.cfg.listen)
    try:
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as e:
                client.generate(request([1, 2, 999999], greedy(4)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            client.generate(request(list(range(20)), greedy(450, ignore_eos=True)), timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        client.close()

    def counted():
        m = scrape(cluster.metrics["coordinator"])
        grew = {code: value(m, "pdserve:request_failure_total", code=code)
                - value(before, "pdserve:request_failure_total", code=code)
                for code in ("INVALID_ARGUMENT", "DEADLINE_EXCEEDED")}
        return grew == {"INVALID_ARGUMENT": 2, "DEADLINE_EXCEEDED": 1}
    wait_until(counted, 10, "the failures to be counted")
    assert value(scrape(cluster.metrics["coordinator"]), "pdserve:num_requests_running") == 0


def test_a_one_process_coordinator_over_a_colocated_node_counts_no_transfer(tiny_models):
    """--workers 1 (no multiprocess directory), a colocated node: no KV moves, so the
    transfer phase is 0; `generate --json` reports the decode admission from the prefill's
    end (it was ~1.8e9 s, counted from transfer_end = 0)."""
    import json
    import subprocess
    import sys
    cluster = start_cluster(model=tiny_models["qwen2"], prefill=0, decode=0, colocated=1, kv_blocks=128,
                            metrics=True)
    try:
        r = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--coordinator", cluster.cfg.listen,
                            "--prompt-ids", "4,8,15,16,23,42", "--max-tokens", "5", "--ignore-eos", "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        server = json.loads(r.stdout)["timings"]["server"]
        assert 0 <= server["decode_admission_s"] < server["e2e_s"] and server["transfer_s"] == 0
        m = settled(cluster.metrics["coordinator"], 5)
        node = scrape(cluster.metrics["both-0"])
    finally:
        cluster.stop()
    assert value(m, "pdserve:request_success_total", finished_reason="length") == 1
    assert value(m, "pdserve:generation_tokens_total") == 5 and value(m, "pdserve:prompt_tokens_total") == 6
    assert value(m, "pdserve:inter_token_latency_seconds_count") == 4
    assert value(m, "pdserve:ttft_phase_seconds_count", phase="transfer") == 1
    assert value(m, "pdserve:ttft_phase_seconds_sum", phase="transfer") == 0
    assert value(m, "pdserve:nodes", role="both", live="true") == 1
    assert value(node, "pdserve:kv_cache_usage_perc") == 0 and not node.get("pdserve:kv_transfers_total")
    assert value(node, "pdserve:prompt_tokens_total") == 6 and value(node, "pdserve:generation_tokens_total") == 5


def test_ttft_phases_add_up_and_clamp_node_clock_skew():
    t = api_pb2.PhaseTimes(received=100.0, reserved=100.5, prefill_start=100.6, prefill_end=101.0,
                           transfer_end=101.25, first_token=101.5)
    assert ttft_phases(t) == {"queue": 0.5, "prefill": 0.5, "transfer": 0.25, "admission": 0.25}
    colocated = api_pb2.PhaseTimes(received=100.0, reserved=100.5, prefill_end=101.0, first_token=101.5,
                                   decode_start=101.75)
    assert ttft_phases(colocated)["transfer"] == 0.0 and sum(ttft_phases(colocated).values()) == 1.5
    skewed = api_pb2.PhaseTimes(received=100.0, reserved=100.5, prefill_end=102.0, transfer_end=102.5,
                                first_token=101.5)  # a node clock ahead of the coordinator's
    phases = ttft_phases(skewed)
    assert min(phases.values()) >= 0 and sum(phases.values()) == 1.5
    # colocated requests have no transfer_end: admission counts from the prefill's end, not from 1970
    assert decode_admission_s(colocated) == 0.75


def test_transfer_failure_reasons_keep_lease_expiry_apart_and_skip_cancels():
    assert failure_reason("lease expired") == "lease_expired"
    assert failure_reason("refused by the receiver: lease expired") == "lease_expired"
    assert failure_reason("send to tcp://x failed: ZMQError: boom") == "transport"
    assert failure_reason("no ack from the receiver within 30 s") == "timeout"
    assert failure_reason("cancelled") is None and failure_reason("withdrawn") is None


def test_the_grafana_dashboard_plots_only_metrics_the_cluster_exposes(cluster):
    """Every pdserve: series the dashboard queries is exposed by the coordinator or a node
    (or declared by the coordinator, for counters no request of this run touched)."""
    import json
    import re
    from pathlib import Path

    from coordinator import metrics as coordinator_metrics
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "pdserve.json").read_text())
    queried = {name for p in dashboard["panels"] for t in p.get("targets", [])
               for name in re.findall(r"pdserve:[a-z0-9_]+", t["expr"])}
    queried |= {re.findall(r"pdserve:[a-z0-9_]+", v["query"]["query"])[0] for v in dashboard["templating"]["list"]
                if v["type"] == "query"}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    families = list(coordinator_metrics.REGISTRY.collect())
    for member in ("coordinator", "prefill-0", "decode-0"):
        text = urllib.request.urlopen(f"http://{cluster.metrics[member]}/metrics", timeout=10).read().decode()
        families += list(text_string_to_metric_families(text))
    exposed = {f.name + s for f in families for s in suffixes.get(f.type, ("",))}
    assert len(queried) > 20 and queried <= exposed, sorted(queried - exposed)


@pytest.fixture(scope="module")
def lone_nodes(tiny_models, tmp_path_factory):
    """A decode and a prefill node with their metrics, registered with the fake coordinator
    of test_node_fencing (no coordinator to renew leases or route)."""
    import subprocess
    import sys
    from concurrent import futures

    from pdserve.cluster import free_port
    from pdserve.v1 import node_pb2_grpc
    from tests.test_node_fencing import FakeCoordinator, Nodes
    fake = FakeCoordinator()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    node_pb2_grpc.add_CoordinatorServicer_to_server(fake, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    metrics, procs, logs = {}, [], tmp_path_factory.mktemp("metrics-nodes")
    for role in ("decode", "prefill"):
        metrics[role] = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "pdserve", "node", "--role", role, "--coordinator", address, "--model",
               tiny_models["qwen2"], "--device", "cpu", "--kv-blocks", "32", "--metrics-listen", metrics[role]]
        with open(logs / f"{role}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
    try:
        fake.wait(lambda: sum(n["beats"] > 0 for n in fake.nodes.values()) == 2, 120, "both nodes to heartbeat")
        channels = {role: grpc.insecure_channel(fake.node(role)[0]) for role in (api_pb2.ROLE_DECODE,
                                                                                 api_pb2.ROLE_PREFILL)}
        yield Nodes(fake, channels), metrics
        for ch in channels.values():
            ch.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        server.stop(0)


def test_transfer_failures_are_counted_by_reason_with_lease_expiry_apart(lone_nodes):
    import threading

    import zmq

    from pdserve.v1 import kv_pb2, node_pb2
    nodes, metrics = lone_nodes
    # a reservation whose lease lapses with no KV: the decode node's failure is lease_expired
    nodes.reserve("lapses", 20, lease_s=0.5)
    wait_until(lambda: value(scrape(metrics["decode"]), "pdserve:kv_transfer_failures_total", transport="zmq",
                             reason="lease_expired") == 1, 10, "the lease expiry to be counted")
    nodes.wait_free()
    # a decode side that refuses the KV (a checksum mismatch): the prefill node's failure is corrupt
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")

    def refusing_decode_node():
        while True:
            parts = router.recv_multipart()
            header = kv_pb2.KVHeader.FromString(parts[1])
            if header.last:
                router.send_multipart([parts[0], kv_pb2.KVAck(transfer_id=header.transfer_id, ok=False,
                                                              error="checksum mismatch at layer 0")
                                       .SerializeToString()])
                return
    peer = threading.Thread(target=refusing_decode_node, daemon=True)
    peer.start()
    ticket = node_pb2.Ticket(transfer_id="t-refused", decode_node_id="fake", epoch=1, lease_expiry=time.time() + 30,
                             kv_endpoint=router.getsockopt_string(zmq.LAST_ENDPOINT), block_ids=[0, 1])
    try:
        with pytest.raises(grpc.RpcError) as e:
            nodes.prefill.Prefill(node_pb2.PrefillRequest(
                request_id="refused", prompt_token_ids=list(range(1, 20)),
                sampling=api_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), ticket=ticket),
                timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        peer.join(5)
    finally:
        router.close(linger=0)
        ctx.term()
    pre, dec = scrape(metrics["prefill"]), scrape(metrics["decode"])
    assert pre["pdserve:kv_transfer_failures_total"] == {(("reason", "corrupt"), ("transport", "zmq")): 1.0}
    assert dec["pdserve:kv_transfer_failures_total"] == {(("reason", "lease_expired"), ("transport", "zmq")): 1.0}
    assert not pre.get("pdserve:kv_transfers_total") and value(dec, "pdserve:num_requests_waiting") == 0


def test_a_killed_worker_keeps_its_counts_and_leaves_the_gauges(cluster):
    """Its counters stay in the sum; the requests it held leave the live gauges (the
    supervisor marks it dead when it starts it again). Eight long streams, one connection
    each, so that a worker holds some when it is killed."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor
    address = cluster.metrics["coordinator"]
    client = Client(cluster.cfg.listen)
    conns = [Client(cluster.cfg.listen, own_connection=True) for _ in range(8)]
    try:
        before = scrape(address)
        assert value(before, "pdserve:request_success_total", finished_reason="length") > 0
        streams = [c.stub.Generate(request(list(range(i, i + 30)), greedy(450, ignore_eos=True)), timeout=60)
                   for i, c in enumerate(conns)]
        for s in streams:
            next(s)  # its first token left: its prompt is counted
        busy = wait_until(lambda: [w for w in client.status()["workers"] if w["inflight"]], 10, "a busy worker")
        os.kill(busy[0]["pid"], signal.SIGKILL)

        def drain(stream):
            try:
                return sum(1 for _ in stream)
            except grpc.RpcError as e:
                return e
        with ThreadPoolExecutor(len(streams)) as pool:
            outs = list(pool.map(drain, streams))
        assert any(isinstance(o, grpc.RpcError) for o in outs), "the killed worker held no stream"
        wait_until(lambda: all(w["ready"] for w in client.status()["workers"])
                   and sum(w["restarts"] for w in client.status()["workers"]) == 1, 60, "the worker to restart")
        wait_until(lambda: value(scrape(address), "pdserve:num_requests_running") == 0, 10,
                   "the dead worker's requests to leave the gauges")
        after = scrape(address)
        assert value(after, "pdserve:prompt_tokens_total") == value(before, "pdserve:prompt_tokens_total") + 8 * 30
        assert value(after, "pdserve:time_to_first_token_seconds_count") \
            == value(before, "pdserve:time_to_first_token_seconds_count") + 8
        assert value(after, "pdserve:num_requests_waiting") == 0
        client.wait_blocks_at_baseline()
    finally:
        for c in conns:
            c.close()
        client.close()
