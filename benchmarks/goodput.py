"""Disaggregated against colocated goodput, side by side on the same devices.

    python benchmarks/goodput.py --workload prefill-heavy [--model M | --shape llama-3.2-1b] [--device cuda]

Starts a 1 prefill + 1 decode cluster, runs a rate sweep with bisection for the
maximum goodput (`pdserve bench --sweep`), stops it, then does the same with 2
colocated nodes on the same devices. Goodput per GPU = max goodput rate / GPUs
used; ratio = disaggregated / colocated goodput per GPU (DistServe's target: 2x on
the workload its argument applies to). Each side's curves, summary and plot land
in benchmarks/results/goodput_<workload>/; the headline JSON in
benchmarks/results/goodput_<workload>.json."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, write_config_folder, write_result  # noqa: E402
from pdserve.cluster import Cluster, ClusterConfig, free_port  # noqa: E402

WORKLOADS = {  # name -> (input len, output len, ttft SLO ms, tpot SLO ms)
    "prefill-heavy": (2048, 64, 1500, 30),
    "decode-heavy": (128, 512, 400, 25),
}


def measure(kind: str, a: argparse.Namespace, model: str, out: Path) -> dict:
    n_in, n_out, ttft, tpot = WORKLOADS[a.workload]
    ttft, tpot = a.ttft or ttft, a.tpot or tpot
    listen = f"127.0.0.1:{free_port()}"
    pools = dict(prefill=1, decode=1) if kind == "disaggregated" else dict(prefill=0, decode=0, colocated=2)
    cluster = Cluster(ClusterConfig(listen=listen, model=model, device=a.device, kv_blocks=a.kv_blocks,
                                    load_format="auto" if a.model else "dummy",
                                    max_num_seqs=a.max_num_seqs, log_dir=tempfile.mkdtemp(), **pools))
    try:
        cluster.start()
        cmd = [sys.executable, "-m", "pdserve", "bench", "--coordinator", listen, "--num-prompts", str(a.num_prompts),
               "--random-input-len", str(n_in), "--random-output-len", str(n_out), "--random-range-ratio", "0.2",
               "--goodput", f"ttft:{ttft}", f"tpot:{tpot}", "--sweep", a.rates, "--bisect-steps", str(a.bisect_steps),
               "--result-dir", str(out), "--result-filename", f"{kind}.json", "--label", f"{kind} ({a.workload})",
               "--disable-tqdm"]
        subprocess.run(cmd, check=True)
    finally:
        cluster.stop()
    result = json.loads((out / f"{kind}.json").read_text())
    gpus = 2  # both sides use two devices: 1P + 1D, or 2 colocated nodes
    return dict(max_goodput_rate=result["sweep"]["max_goodput_rate"], gpus=gpus,
                goodput_per_gpu=result["sweep"]["max_goodput_rate"] / gpus, curve=result["sweep"]["curve"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="prefill-heavy")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: random weights of --shape)")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rates", default="1,2,4,8,16")
    ap.add_argument("--bisect-steps", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--ttft", type=float, default=None, help="TTFT SLO ms (default per workload)")
    ap.add_argument("--tpot", type=float, default=None, help="TPOT SLO ms (default per workload)")
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    out = RESULTS / f"goodput_{args.workload.replace('-', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_config_folder(args.shape, Path(tmp) / args.shape))
        disagg = measure("disaggregated", args, model, out)
        coloc = measure("colocated", args, model, out)
    ratio = disagg["goodput_per_gpu"] / coloc["goodput_per_gpu"] if coloc["goodput_per_gpu"] else float("inf")
    print(f"goodput per GPU: disaggregated {disagg['goodput_per_gpu']:.2f}, colocated {coloc['goodput_per_gpu']:.2f} "
          f"req/s -> ratio {ratio:.2f} (target 2)")
    n_in, n_out, ttft, tpot = WORKLOADS[args.workload]
    config = dict(workload=args.workload, input_len=n_in, output_len=n_out, ttft_ms=args.ttft or ttft,
                  tpot_ms=args.tpot or tpot, rates=args.rates, num_prompts=args.num_prompts,
                  model=args.model or args.shape, device=args.device)
    path = write_result(f"goodput_{args.workload.replace('-', '_')}", f"goodput_{args.workload.replace('-', '_')}",
                        ratio, 2.0, config, commit_id=args.commit, disaggregated=disagg, colocated=coloc)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
