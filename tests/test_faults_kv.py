"""Faults of the KV link between a prefill and a decode node, from the test-only fault
hooks of the ZeroMQ transport (kv_transfer/base/faults.py, armed by signal): the
connection cut under a transfer, and a frame corrupted after its checksum was taken.
Either way the request is retried (or ends with a precise status), is never decoded
from bad KV, and every node's KV returns to baseline."""
from __future__ import annotations

import os
import signal

from tests.cluster_util import Client, start_cluster
from tests.conftest import assert_matches_reference
from tests.fault_util import pids_by_role, run_all, wait_until


def jobs_of(seed: int, n: int):
    return [([(seed * 17 + i * 5 + j) % 384 for j in range(24)], 12) for i in range(n)]


def run_with_fault(tiny_models, reference, tmp_path, sig: int, evidence: str, decode: int) -> None:
    cluster = start_cluster(model=tiny_models["qwen2"], decode=decode, kv_blocks=64, log_dir=str(tmp_path),
                            node_flags=("--kv-fault-hooks", "--kv-ack-timeout", "2"))
    client = Client(cluster.cfg.listen)
    prefill = pids_by_role(cluster)["prefill"][0]
    log = tmp_path / "1-prefill.log"
    try:
        wait_until(lambda: "fault hooks installed" in log.read_text(), 30, "the fault hooks")
        os.kill(prefill, sig)
        jobs = jobs_of(sig, 4)
        outs = run_all(client, jobs, timeout=20)
        assert evidence in log.read_text(), "the fault never fired"
        failed = [o for o in outs if not isinstance(o, dict)]
        assert not failed, f"{len(failed)} failed, e.g. {failed[0].code()}: {failed[0].details()}"
        ref = reference(tiny_models["qwen2"])
        for (prompt, n), out in zip(jobs, outs):
            assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "after a KV fault")
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()


def test_a_kv_link_cut_mid_transfer_is_retried_instead_of_hanging(tiny_models, reference, tmp_path):
    """The cut transfer's last messages are lost: no ack ever comes. The prefill node gives
    up after --kv-ack-timeout, the coordinator retries on the other decode node (the
    clients' 20 s deadline would otherwise end it DEADLINE_EXCEEDED)."""
    run_with_fault(tiny_models, reference, tmp_path, signal.SIGUSR1, "cutting the connection", decode=2)


def test_a_corrupted_kv_frame_is_never_decoded_and_is_retried_even_on_the_only_decode_node(tiny_models, reference,
                                                                                           tmp_path):
    """The receiver refuses the frame (checksum); the retry may go to the same decode node when
    it is the only one (a transfer failure sends the next attempt to other decode nodes first,
    not to none)."""
    run_with_fault(tiny_models, reference, tmp_path, signal.SIGUSR2, "corrupting a frame", decode=1)
