"""Chaos harness: a real cluster under steady load at a fixed rate while faults strike one
at a time (chaos_faults.py: SIGKILL and SIGSTOP of a prefill node, a decode node, a
coordinator worker and the whole coordinator, a KV link cut, a corrupted KV frame, a
client that stops reading, a burst far above capacity), each followed by recovery.

    python benchmarks/chaos.py --device cpu --shape tiny                 # -> results/chaos.json
    python benchmarks/chaos.py --mode soak --duration 3600 --fault-every 300 --rate R --device cuda \\
        --shape llama-3.2-1b --prefill 1 --decode 1 --workers 1          # -> results/soak.json + plots

Per request (chaos_load.py): complete, a precise gRPC status (which), or lost (no status
before its deadline); duplicated or skipped stream indexes. Per fault: KV blocks left
on the surviving nodes once the load stopped (leaked), and recovery seconds (from the
strike to the send time of the last request that did not complete). chaos: ratio =
(completed + failed with a precise status) / sent, target 1.0 with 0 lost, 0 index
errors, 0 leaked blocks. soak (a fault every --fault-every s): RSS (and GPU memory) of
every process and KV blocks over time, p99 TTFT/TPOT per --window; ratio = p99 TTFT of
the last window / the first (target <= 1.2), memory growth target flat within 5%.
run_chaos() and soak() take a running Cluster, so tests call them directly."""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling modules
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's pdserve, run from anywhere

from chaos_faults import FAULTS, Faults, leaked_blocks  # noqa: E402
from chaos_load import Load, Outcome  # noqa: E402
from chaos_soak import soak  # noqa: E402


def prompts_for(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def summarize(outs: list[Outcome], struck: float, check=None, prompts=None) -> dict:
    codes = Counter(o.status for o in outs if o.status not in ("ok", "lost"))
    completed = [o for o in outs if o.status == "ok"]
    wrong = sum(1 for o in completed if check is not None and not check(prompts[o.prompt], o.token_ids))
    bad = [o for o in outs if o.status != "ok" and o.sent >= struck]
    ttfts = sorted(o.ttft for o in completed if o.ttft is not None)
    return dict(sent=len(outs), completed=len(completed), failed=dict(codes),
                precise=sum(o.precise for o in outs), lost=sum(o.status == "lost" for o in outs),
                index_errors=sum(o.duplicates + o.skips for o in outs), wrong_outputs=wrong,
                retry_hints=sum(o.retry_after_ms is not None for o in outs if o.status == "RESOURCE_EXHAUSTED"),
                recovery_s=round(max((o.sent - struck for o in bad), default=0.0), 3),
                p99_ttft_s=round(ttfts[int(0.99 * (len(ttfts) - 1))], 4) if ttfts else None,
                examples=sorted({f"{o.status}: {o.detail}"[:200] for o in outs if o.status != "ok"})[:5])


def run_chaos(cluster, faults: list[str], prompts: list[list[int]], max_tokens: int, rate: float,
              timeout_s: float = 60.0, warm_s: float = 2.0, settle_s: float = 4.0, burst: int = 64,
              check=None, log=print) -> dict:
    """One fault at a time under load: warm_s of load, the fault (and its healing), settle_s
    more, then the load stops and the nodes' KV must return to baseline. check(prompt,
    tokens) -> bool judges each completed output. Returns the per-fault summaries and totals."""
    address = cluster.cfg.listen
    results = {}
    for fault in faults:
        load = Load(address, prompts, max_tokens, rate, timeout_s)
        injector = Faults(cluster, load, burst=burst)
        load.start()
        time.sleep(warm_s)
        load.window = fault
        struck = injector.inject(fault)
        time.sleep(settle_s)
        stalled = injector.stalled.finish(timeout_s) if injector.stalled is not None else None
        load.stop()
        leaked, nodes = leaked_blocks(address)
        summary = summarize(load.outcomes, struck, check, prompts)
        if stalled is not None:  # the stalled client's own request
            summary["sent"] += 1
            summary["stalled_client"] = stalled
            if stalled == "OK":
                summary["completed"] += 1
            elif stalled == "lost":
                summary["lost"] += 1
            else:
                summary["failed"][stalled] = summary["failed"].get(stalled, 0) + 1
                summary["precise"] += stalled in ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED")
        summary["leaked_blocks"] = leaked
        summary["nodes"] = [{k: n[k] for k in ("role", "kv_blocks_free", "kv_blocks_total", "running")}
                            for n in nodes]
        results[fault] = summary
        log(f"{fault}: " + json.dumps({k: v for k, v in summary.items() if k not in ("nodes", "examples")}))
    totals = {k: sum(r[k] for r in results.values())
              for k in ("sent", "completed", "precise", "lost", "index_errors", "leaked_blocks", "wrong_outputs")}
    totals["ratio"] = (totals["completed"] + totals["precise"]) / max(1, totals["sent"])
    return {"faults": results, "totals": totals}


def chaos_cluster(a: argparse.Namespace, model: str, log_dir: str):
    """The cluster under test: its coordinator ends stalled clients after 2 s; on zmq the
    prefill nodes arm the KV fault hooks and give up on an unacknowledged transfer after 2 s."""
    from pdserve.cluster import Cluster, ClusterConfig, free_port
    hooks = ("--kv-fault-hooks", "--kv-ack-timeout", "2") if a.kv_transport == "zmq" else ()
    cfg = ClusterConfig(prefill=a.prefill, decode=a.decode, model=model, device=a.device, workers=a.workers,
                        listen=f"127.0.0.1:{free_port()}", kv_blocks=a.kv_blocks, load_format="dummy",
                        max_inflight=a.max_inflight,
                        kv_transport=a.kv_transport, log_dir=log_dir,
                        coordinator_flags=("--client-stall-timeout", "2", "--max-queued", str(a.max_queued)),
                        node_flags=hooks)
    cluster = Cluster(cfg)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("chaos", "soak"), default="chaos")
    ap.add_argument("--shape", default="tiny", help="random weights of this benchmarks/common.py shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="coordinator workers (the worker faults need 2+)")
    ap.add_argument("--kv-transport", default="zmq", choices=("zmq", "nccl", "cuda-ipc"),
                    help="the KV faults need zmq (its test-only hooks)")
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--max-inflight", type=int, default=32, help="the coordinator's --max-inflight")
    ap.add_argument("--max-queued", type=int, default=64, help="the coordinator's --max-queued (the burst exceeds "
                                                                "both)")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {','.join(FAULTS)}")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (soak: ~70%% of the max goodput)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=60.0, help="each request's deadline: past it, lost")
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--duration", type=float, default=180.0, help="soak: seconds")
    ap.add_argument("--fault-every", type=float, default=60.0, help="soak: seconds between faults")
    ap.add_argument("--window", type=float, default=30.0, help="soak: seconds per p99 window")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--commit", default=None)
    a = ap.parse_args()
    from common import SHAPES, write_config_folder, write_result
    faults = [f for f in a.faults.split(",") if f]
    if a.kv_transport != "zmq":
        faults = [f for f in faults if not f.startswith("kv-")]
    if a.workers < 2:
        faults = [f for f in faults if "worker" not in f]
    work = Path(tempfile.mkdtemp(prefix="pdserve-chaos-"))
    model = str(write_config_folder(a.shape, work / a.shape))
    prompts = prompts_for(SHAPES[a.shape]["vocab_size"], 16, a.input_len)
    cluster = chaos_cluster(a, model, str(work))
    config = {k: getattr(a, k) for k in ("shape", "prefill", "decode", "workers", "kv_transport", "rate",
                                         "input_len", "output_len", "timeout", "burst")}
    out = Path(a.out) if a.out else None
    try:
        if a.mode == "chaos":
            res = run_chaos(cluster, faults, prompts, a.output_len, a.rate, a.timeout, burst=a.burst)
            t = res["totals"]
            path = write_result("chaos", "chaos", t["ratio"], 1.0, {**config, "faults": faults}, a.commit, out,
                                ratio_of="(completed + failed with a precise status) / sent", **res)
            print(f"chaos: ratio {t['ratio']:.3f} (target 1.0), lost {t['lost']}, index errors {t['index_errors']}, "
                  f"leaked blocks {t['leaked_blocks']} -> {path}")
        else:
            res = soak(cluster, faults, prompts, a.output_len, a.rate, a.duration, a.fault_every, a.window,
                       timeout_s=a.timeout, plot_dir=(out or Path(__file__).parent / "results") / "soak")
            path = write_result("soak", "soak", res["ratio"], 1.2,
                                {**config, "duration": a.duration, "fault_every": a.fault_every, "window": a.window,
                                 "faults": faults}, a.commit, out,
                                ratio_of="p99 TTFT: last window / first window",
                                **{k: v for k, v in res.items() if k != "ratio"})
            print(f"soak: ratio {res['ratio']} (target <= 1.2), memory growth {res['max_rss_growth']} -> {path}")
    finally:
        cluster.stop()
        print(f"members' logs: {work}")


if __name__ == "__main__":
    main()
