"""Overload: far more requests than the coordinator admits. The queue is bounded, the
refused get RESOURCE_EXHAUSTED with a retry hint in the trailing metadata, and a
client that floods the queue does not lock another client out. Real processes on
loopback; every admitted request completes and KV returns to baseline."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from tests.cluster_util import Client, greedy, request, start_cluster
from tests.fault_util import run_all, wait_until


def test_a_flood_from_one_client_gets_retry_hints_and_does_not_lock_out_another(tiny_models):
    cluster = start_cluster(model=tiny_models["qwen2"], kv_blocks=64, max_inflight=1,
                            coordinator_flags=("--max-queued", "6"))
    flood, polite = Client(cluster.cfg.listen, own_connection=True), Client(cluster.cfg.listen, own_connection=True)
    refused, served = [], []

    def one(i):
        try:
            served.append(flood.generate(request([(3 * i + j) % 384 for j in range(16)],
                                                 greedy(400, ignore_eos=True)), timeout=120))
        except grpc.RpcError as e:
            refused.append(e)
    pool = ThreadPoolExecutor(20)
    try:
        futures = [pool.submit(one, i) for i in range(20)]
        wait_until(lambda: len(refused) >= 13, 60, "the flood to fill the queue")  # 1 served + 6 queued, 13 refused
        outs = run_all(polite, [([(5 * i + j) % 384 for j in range(16)], 8) for i in range(3)], timeout=120)
        failed = [o for o in outs if not isinstance(o, dict)]
        assert not failed, f"the second client was locked out: {[(e.code(), e.details()) for e in failed]}"
        for f in futures:
            f.result()
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), \
            [(e.code(), e.details()) for e in refused]
        for e in refused:
            hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
            assert hint is not None and int(hint) > 0, f"no retry hint: {e.trailing_metadata()}"
        assert len(served) >= 4 and all(len(o["token_ids"]) == 400 for o in served), len(served)
        polite.wait_blocks_at_baseline()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        flood.close()
        polite.close()
        cluster.stop()
