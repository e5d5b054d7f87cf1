"""The chaos harness (benchmarks/chaos.py) on a tiny-model cluster: steady load, and one
of each fault kind in turn (SIGKILL and SIGSTOP of a prefill node, a decode node, a
coordinator worker and the whole coordinator, a KV link cut, a corrupted KV frame, a
client that stops reading, a burst far above capacity). Every request completes or
ends with a precise status, none is lost, no stream skips or repeats an index, every
completed output equals the transformers reference, and KV returns to baseline on
every node after each fault."""
from __future__ import annotations

from benchmarks.chaos import FAULTS, prompts_for, run_chaos
from tests.cluster_util import start_cluster
from tests.conftest import assert_matches_reference


def test_one_of_each_fault_under_load_loses_nothing_and_leaks_nothing(tiny_models, reference, tmp_path):
    model = tiny_models["qwen2"]
    cluster = start_cluster(model=model, prefill=2, decode=2, workers=2, kv_blocks=128, max_inflight=8,
                            log_dir=str(tmp_path),
                            coordinator_flags=("--client-stall-timeout", "2", "--max-queued", "8"),
                            node_flags=("--kv-fault-hooks", "--kv-ack-timeout", "2"))
    ref = reference(model)

    def check(prompt, tokens) -> bool:
        try:
            assert_matches_reference(tokens, ref.generate(prompt, len(tokens)))
            return True
        except AssertionError:
            return False
    try:
        res = run_chaos(cluster, list(FAULTS), prompts_for(384, 8, 12), max_tokens=8, rate=2.0, timeout_s=60,
                        warm_s=1.0, settle_s=3.0, burst=64, check=check)
    finally:
        cluster.stop()
    faults, totals = res["faults"], res["totals"]
    assert totals["lost"] == 0 and totals["index_errors"] == 0 and totals["leaked_blocks"] == 0, faults
    assert totals["wrong_outputs"] == 0, faults
    assert totals["ratio"] == 1.0, faults  # completed or a precise status, every one
    assert faults["burst"]["failed"].get("RESOURCE_EXHAUSTED", 0) > 0, faults["burst"]
    assert faults["burst"]["retry_hints"] == faults["burst"]["failed"]["RESOURCE_EXHAUSTED"]
    assert faults["stalled-client"]["stalled_client"] == "RESOURCE_EXHAUSTED", faults["stalled-client"]
    assert "cutting the connection" in "".join(p.read_text() for p in tmp_path.glob("*prefill.log"))
    assert "checksum mismatch" in "".join(p.read_text() for p in tmp_path.glob("*.log"))
