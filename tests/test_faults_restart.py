"""A coordinator that dies and is restarted on its address: the nodes, whose heartbeats
failed all the while, register with the successor within a few heartbeat intervals of
its start, however long the coordinator was gone (their channel does not back off to
minutes), and it serves again. Real processes on loopback."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.fault_util import pids_by_role, start_coordinator, wait_until


def test_a_restarted_coordinator_serves_again_within_a_few_heartbeats_after_a_long_outage(tiny_models):
    interval = 1.0
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, heartbeat_interval_s=interval)
    client = Client(cluster.cfg.listen)
    successor = None
    try:
        assert len(client.generate(request([1, 2, 3], greedy(4, ignore_eos=True)))["token_ids"]) == 4
        os.kill(pids_by_role(cluster)["coordinator"][0], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as e:  # nothing listens: refused at once, not a hang
            client.generate(request([1, 2, 3], greedy(4)), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        time.sleep(40)  # long enough for a default gRPC reconnect backoff to reach tens of seconds
        successor = start_coordinator(cluster.cfg.listen, "--heartbeat-interval", str(interval))
        wait_until(lambda: sum(n["healthy"] for n in client.status()["nodes"]) == 2, 5 * interval,
                   "the nodes to register with the restarted coordinator")
        assert len(client.generate(request([1, 2, 3], greedy(4, ignore_eos=True)))["token_ids"]) == 4
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        if successor is not None:
            successor.kill()
            successor.wait()
        cluster.stop()
