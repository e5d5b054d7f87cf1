"""A client that stops reading before its first response got through (a flow-control
window smaller than that response): the coordinator ends the request after
--client-stall-timeout, and once the client reads again it gets RESOURCE_EXHAUSTED,
not a stream that never ends. Real processes on loopback."""
from __future__ import annotations

import grpc

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.fault_util import StalledClient, wait_until


def test_a_client_stalled_before_its_first_response_gets_a_status_once_it_reads(tiny_models, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, log_dir=str(tmp_path),
                            coordinator_flags=("--client-stall-timeout", "1.5"))
    client = Client(cluster.cfg.listen)
    prompt = [200 + (i * 37) % 180 for i in range(12)]  # ids of two varint bytes: the first response is > 16 bytes
    stalled = StalledClient(cluster.cfg.listen, request(prompt, greedy(64, ignore_eos=True)), window=16)
    try:
        wait_until(lambda: "read nothing" in (tmp_path / "0-coordinator.log").read_text(), 30, "the cut")
        stalled.resume()
        wait_until(stalled.ended.is_set, 20, "the stalled stream to end")
        code, message = stalled.status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (code, message)
        client.wait_blocks_at_baseline()
    finally:
        stalled.close()
        client.close()
        cluster.stop()
