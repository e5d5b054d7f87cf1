"""A prefill node killed while requests wait on it, before their first token: each is
prefilled again on the other prefill node, transparently to its client (no error, the
reference's tokens, indexes from 0), and the decode reservation its dead attempt held
is released: KV returns to baseline. Real processes on loopback, faults by signal."""
from __future__ import annotations

import os
import signal
import time

from tests.cluster_util import Client, start_cluster
from tests.conftest import assert_matches_reference
from tests.fault_util import pids_by_role, submit


def test_a_prefill_node_killed_before_the_first_token_is_retried_elsewhere_and_frees_its_reservation(
        tiny_models, reference, tmp_path):
    cluster = start_cluster(model=tiny_models["qwen2"], prefill=2, kv_blocks=64, heartbeat_interval_s=2.0,
                            log_dir=str(tmp_path), coordinator_flags=("--lease", "60"))
    client = Client(cluster.cfg.listen)
    victim = pids_by_role(cluster)["prefill"][0]
    try:
        jobs = [([(11 * i + j) % 384 for j in range(40)], 10) for i in range(6)]
        os.kill(victim, signal.SIGSTOP)  # requests routed to it wait there, their reservations held
        pending = submit(client, jobs, timeout=30)
        time.sleep(1.0)  # well inside the 6 s the coordinator takes to notice missed heartbeats
        os.kill(victim, signal.SIGKILL)
        outs = pending.result()
        failed = [o for o in outs if not isinstance(o, dict)]
        assert not failed, f"{len(failed)} failed, e.g. {failed[0].code()}: {failed[0].details()}"
        ref = reference(tiny_models["qwen2"])
        for (prompt, n), out in zip(jobs, outs):
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "after the prefill node died")
        assert "tries again" in (tmp_path / "0-coordinator.log").read_text(), "no request was on the victim"
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
