"""Disaggregated against colocated goodput, side by side on the same devices.

    python benchmarks/goodput.py --workload prefill-heavy [--model M | --shape llama-3.2-1b] [--device cuda]

Starts 2 colocated nodes, measures the unloaded latency (concurrency 1) and sets
the SLOs from it unless --ttft/--tpot are given (TTFT and TPOT multiples per
workload: DistServe scales SLOs to the model and device the same way), runs a rate
sweep with bisection for the maximum goodput (`pdserve bench --sweep`), stops it,
then does the same sweep on a 1 prefill + 1 decode cluster on the same devices.
Goodput per GPU = max goodput rate / GPUs used; ratio = disaggregated / colocated
goodput per GPU (DistServe's target: 2x on the workload its argument applies to), at
every SLO scale of --slo-scales (the SLOs multiplied by each, as DistServe's figures
do); the headline is the ratio at --headline-scale, bisected on both sides, and says
whether it is exact or a bound. Other scales come from the rates run (bisected too with
--bisect-all-scales), each with the range the runs allow. The benchmark holds a host
lock and watches nvidia-smi: a host shared with other GPU work is refused at the
start (--allow-shared runs anyway) and flagged in the result if seen during the run.
Each side's curves (every run, with the rate offered), summary and plot land in
benchmarks/results/goodput_<workload>/; the headline JSON in
benchmarks/results/goodput_<workload>.json."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, HostWatch, stamp_parts, write_config_folder, write_result
from pdserve.cluster import Cluster, ClusterConfig, free_port

WORKLOADS = {  # name -> (input len, output len, TTFT SLO, TPOT SLO as multiples of the unloaded latency)
    "prefill-heavy": (2048, 64, 3.0, 1.5),    # long prompts, short outputs, tight TPOT
    "decode-heavy": (128, 512, 3.0, 2.0),     # short prompts, long outputs
}


def bench(listen: str, a: argparse.Namespace, out: Path, name: str, extra: list[str]) -> dict | None:
    n_in, n_out = WORKLOADS[a.workload][:2]
    cmd = [sys.executable, "-m", "pdserve", "bench", "--coordinator", listen, "--random-input-len", str(n_in),
           "--random-output-len", str(n_out), "--random-range-ratio", "0.2", "--result-dir", str(out),
           "--result-filename", f"{name}.json", "--disable-tqdm", *extra]
    subprocess.run(cmd, check=True)
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def unloaded_slos(listen: str, a: argparse.Namespace, out: Path) -> dict:
    """SLOs as multiples of the median TTFT and TPOT at concurrency 1."""
    bench(listen, a, out, "warmup", ["--num-prompts", "8", "--max-concurrency", "4"])  # first-shape kernel builds
    base = bench(listen, a, out, "baseline", ["--num-prompts", "12", "--max-concurrency", "1", "--save-result"])
    ttft_x, tpot_x = WORKLOADS[a.workload][2:]
    slos = dict(ttft=round(base["median_ttft_ms"] * ttft_x, 1), tpot=round(base["median_tpot_ms"] * tpot_x, 2),
                baseline_ttft_ms=base["median_ttft_ms"], baseline_tpot_ms=base["median_tpot_ms"])
    print(f"unloaded: TTFT {base['median_ttft_ms']:.1f} ms, TPOT {base['median_tpot_ms']:.2f} ms -> SLOs "
          f"TTFT {slos['ttft']} ms, TPOT {slos['tpot']} ms", flush=True)
    return slos


def measure(kind: str, a: argparse.Namespace, model: str, out: Path, slos: dict | None) -> tuple[dict, dict]:
    listen = f"127.0.0.1:{free_port()}"
    logs = out / "logs" / kind  # the members' logs, kept beside the results (not committed)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    pools = dict(prefill=1, decode=1) if kind == "disaggregated" else dict(prefill=0, decode=0, colocated=2)
    cluster = Cluster(ClusterConfig(listen=listen, model=model, device=a.device, kv_blocks=a.kv_blocks,
                                    load_format="auto" if a.model else "dummy",
                                    max_num_seqs=a.max_num_seqs, log_dir=str(logs),
                                    kv_transport=a.kv_transport if kind == "disaggregated" else "zmq",
                                    kv_max_ctas=a.kv_max_ctas, kv_min_message_mib=a.kv_min_message_mib, **pools))
    try:
        cluster.start()
        if slos is None:
            slos = unloaded_slos(listen, a, out)
        result = bench(listen, a, out, kind, [
            "--num-prompts", str(a.num_prompts), "--goodput", f"ttft:{slos['ttft']}", f"tpot:{slos['tpot']}",
            "--sweep", a.rates, "--bisect-steps", str(a.bisect_steps), "--label", f"{kind} ({a.workload})",
            "--sweep-duration", str(a.sweep_duration), "--slo-scale", a.slo_scales,
            "--headline-scale", str(a.headline_scale), "--seeds", str(a.seeds), "--seed", str(a.seed),
            "--num-warmups", str(a.num_warmups),
            *(["--bisect-all-scales"] if a.bisect_all_scales else [])])
    finally:
        cluster.stop()
    gpus = 2  # both sides use two devices: 1P + 1D, or 2 colocated nodes
    sw = result["sweep"]
    return dict(max_goodput_rate=sw["max_goodput_rate"], next_missing_rate=sw["next_missing_rate"],
                bracketed=sw["bracketed"], gpus=gpus, goodput_per_gpu=sw["max_goodput_rate"] / gpus,
                headline_scale=sw["headline_scale"], by_scale=sw["by_scale"], seeds=sw["seeds"],
                curve=sw["curve"]), slos


def ratio_bound(disagg: dict, coloc: dict) -> str:
    """A side whose every swept rate met the SLOs gives a lower bound of its goodput, and
    so a bound of the ratio."""
    return {(True, True): "exact", (False, True): "lower bound", (True, False): "upper bound"}.get(
        (disagg["bracketed"], coloc["bracketed"]), "unknown")


def ratios_by_scale(disagg: dict, coloc: dict) -> list[dict]:
    """The ratio at each SLO scale, and the range the rates run allow: each side's goodput
    lies in [max_goodput_rate, next_missing_rate) (no upper end where no rate missed)."""
    rows = []
    for d, c in zip(disagg["by_scale"], coloc["by_scale"]):
        d_lo, d_hi, c_lo, c_hi = d["max_goodput_rate"], d["next_missing_rate"], c["max_goodput_rate"], c["next_missing_rate"]
        ratio = d_lo / c_lo if c_lo else None  # both sides use two GPUs: per GPU as per cluster
        rows.append(dict(scale=d["scale"], slos_ms=d["slos_ms"], ratio=ratio,
                         ratio_range=[d_lo / c_hi if c_hi else 0.0, d_hi / c_lo if d_hi and c_lo else None],
                         disaggregated=[d_lo, d_hi], colocated=[c_lo, c_hi],
                         bound=ratio_bound(d, c) if ratio else "unknown",
                         bisected=d["bisected"] and c["bisected"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="prefill-heavy")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: random weights of --shape)")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rates", default="4,8,16,32,64")
    ap.add_argument("--bisect-steps", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=60, help="requests per rate, at least")
    ap.add_argument("--sweep-duration", type=float, default=10.0,
                    help="seconds of arrivals per rate (more requests at higher rates: steady state, not a burst)")
    ap.add_argument("--ttft", type=float, default=None, help="TTFT SLO ms (default: a multiple of the unloaded TTFT)")
    ap.add_argument("--tpot", type=float, default=None, help="TPOT SLO ms (default: a multiple of the unloaded TPOT)")
    ap.add_argument("--kv-transport", default="nccl", choices=["zmq", "nccl", "cuda-ipc"],
                    help="the disaggregated cluster's KV transport (nccl needs GPUs; gloo stands in on CPU)")
    ap.add_argument("--kv-max-ctas", type=int, default=None, help="nccl: the nodes' --kv-max-ctas (default theirs)")
    ap.add_argument("--kv-min-message-mib", type=float, default=None,
                    help="nccl: the nodes' --kv-min-message-mib (default theirs)")
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--slo-scales", default="0.5,1,2,4",
                    help="SLO multipliers the ratio is reported at (DistServe's figures scale them 0.5-4x)")
    ap.add_argument("--headline-scale", type=float, default=1.0, help="the scale whose ratio is the headline")
    ap.add_argument("--bisect-all-scales", action="store_true", help="bisect every scale (more runs), not only the headline")
    ap.add_argument("--seeds", type=int, default=1, help="runs per rate, each its own seed (the spread is recorded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-warmups", type=int, default=4, help="unmeasured requests before every run of the sweeps")
    ap.add_argument("--allow-shared", action="store_true",
                    help="measure even when the host runs other GPU work (the result is flagged)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--result-name", default=None,
                    help="result file and folder name (default goodput_<workload>; a variant's runs beside it)")
    args = ap.parse_args()
    name = args.result_name or f"goodput_{args.workload.replace('-', '_')}"
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, HostWatch(args.allow_shared) as host:
        model = args.model or str(write_config_folder(args.shape, Path(tmp) / args.shape))
        given = dict(ttft=args.ttft, tpot=args.tpot) if args.ttft and args.tpot else None
        coloc, slos = measure("colocated", args, model, out, given)
        disagg, _ = measure("disaggregated", args, model, out, slos)
    # no ratio when colocated met the SLOs at no rate of the sweep (lower the rates)
    ratio = disagg["goodput_per_gpu"] / coloc["goodput_per_gpu"] if coloc["goodput_per_gpu"] else None
    bound = ratio_bound(disagg, coloc) if ratio else "unknown"
    by_scale = ratios_by_scale(disagg, coloc)
    print(f"goodput per GPU: disaggregated {disagg['goodput_per_gpu']:.2f}, colocated {coloc['goodput_per_gpu']:.2f} "
          f"req/s -> ratio {ratio if ratio is None else round(ratio, 2)} ({bound}; SLO scale {args.headline_scale:g}; "
          f"target 2)")
    for r in by_scale:
        rng = "-".join("?" if x is None else f"{x:.2f}" for x in r["ratio_range"])
        print(f"  SLO scale {r['scale']:4g}: ratio {'-' if r['ratio'] is None else round(r['ratio'], 2)} "
              f"(runs allow {rng}; disaggregated {r['disaggregated']}, colocated {r['colocated']} req/s)")
    if host.shared():
        print(f"WARNING: the host was shared during the run: {host.describe()}")
    n_in, n_out = WORKLOADS[args.workload][:2]
    config = dict(workload=args.workload, input_len=n_in, output_len=n_out, ttft_ms=slos["ttft"], tpot_ms=slos["tpot"],
                  slo_rule="given" if given else "TTFT x%g, TPOT x%g of unloaded" % WORKLOADS[args.workload][2:],
                  unloaded=dict(ttft_ms=slos.get("baseline_ttft_ms"), tpot_ms=slos.get("baseline_tpot_ms")),
                  rates=args.rates, num_prompts=args.num_prompts, sweep_duration_s=args.sweep_duration,
                  model=args.model or args.shape, device=args.device, kv_transport=args.kv_transport, ratio_is=bound,
                  kv_max_ctas=args.kv_max_ctas, kv_min_message_mib=args.kv_min_message_mib,
                  slo_scales=args.slo_scales, headline_scale=args.headline_scale, seeds=args.seeds, seed=args.seed,
                  num_warmups=args.num_warmups,
                  host=host.record())
    path = write_result(name, f"goodput_{args.workload.replace('-', '_')}",
                        ratio, 2.0, config, commit_id=args.commit, ratio_by_slo_scale=by_scale,
                        disaggregated=disagg, colocated=coloc)
    stamp_parts(out, json.loads(path.read_text()))  # the sweeps' own files carry the run's fields too
    print(f"-> {path}")


if __name__ == "__main__":
    main()
