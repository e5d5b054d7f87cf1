"""Disaggregation on one GPU: 1 prefill + 1 decode node over cuda-ipc, both on the GPU,
against one colocated node on it, serving the same workload.

    python benchmarks/serving_1p1d.py [--gpu 0] [--shape llama-3.2-1b] [--rounds 2]
    python benchmarks/serving_1p1d.py --device cpu --shape tiny --num-prompts 8 --concurrency 4 \\
        --input-len 16 --output-len 8 --rounds 1        # a smoke run on CPU (KV over host shared memory)

The workload is issue 21's: random bf16 weights of the shape, 128-token prompts, 256
output tokens, 256 concurrent streams (`pdserve bench`, 1024 prompts). Each round starts
a fresh cluster of each kind (`pdserve up` with its one-GPU layout: the prefill node
first with --gpu-memory-utilization 0.3, then the decode node with its share of what is
left) and benches it alone; the order alternates between rounds. ratio = median output
tok/s of 1P1D / colocated; target >= 0.8. The rows carry the TTFT split (mean ms per
phase: queue, reserve, prefill, transfer, decode admission) of both."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_config_folder, write_result

KINDS = {"1P1D cuda-ipc": dict(prefill=1, decode=1, kv_transport="cuda-ipc"),
         "colocated": dict(prefill=0, decode=0, colocated=1)}


def bench_one(kind: str, a: argparse.Namespace, model: Path, work: Path) -> dict:
    """A fresh cluster of `kind`, benched; the bench's summary."""
    from pdserve.cluster import Cluster, ClusterConfig, free_port
    listen = f"127.0.0.1:{free_port()}"
    logs = work / f"logs_{kind.replace(' ', '_')}_{len(list(work.glob('logs_*')))}"
    logs.mkdir()
    cluster = Cluster(ClusterConfig(listen=listen, model=str(model), device=a.device, load_format="dummy",
                                    dtype="bfloat16" if a.device == "cuda" else "float32",
                                    max_num_seqs=a.concurrency, log_dir=str(logs), **KINDS[kind]))
    cluster.start()
    try:
        name = f"bench_{len(list(work.glob('bench_*.json')))}.json"
        subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", listen, "--num-prompts",
                        str(a.num_prompts), "--max-concurrency", str(a.concurrency), "--random-input-len",
                        str(a.input_len), "--random-output-len", str(a.output_len), "--disable-tqdm",
                        "--save-result", "--result-dir", str(work), "--result-filename", name],
                       check=True, capture_output=True)
        s = json.loads((work / name).read_text())
    finally:
        cluster.stop()
    if s["failed"]:
        raise RuntimeError(f"{kind}: {s['failed']} requests failed: {s['errors'][:3]}")
    return s


def row(summaries: list[dict]) -> dict:
    keys = summaries[0]["ttft_split_mean_ms"].keys()
    return dict(output_tok_s=[round(s["output_throughput"], 1) for s in summaries],
                request_s=[round(s["request_throughput"], 2) for s in summaries],
                mean_ttft_ms=[round(s["mean_ttft_ms"], 2) for s in summaries],
                mean_tpot_ms=[round(s["mean_tpot_ms"], 3) for s in summaries],
                ttft_split_mean_ms={k: round(statistics.mean(s["ttft_split_mean_ms"][k] for s in summaries), 3)
                                    for k in keys})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="0", help="the one GPU both kinds run on (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--result-name", default="serving_1p1d_one_gpu")
    a = ap.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = a.gpu   # before torch: the cluster sees one GPU and shares it
    work = Path(tempfile.mkdtemp(prefix="serving_1p1d_"))
    model = write_config_folder(a.shape, work / a.shape)
    got: dict[str, list[dict]] = {k: [] for k in KINDS}
    for r in range(a.rounds):
        for kind in (list(KINDS) if r % 2 == 0 else list(KINDS)[::-1]):
            s = bench_one(kind, a, model, work)
            got[kind].append(s)
            print(f"round {r} {kind:14s}: {s['output_throughput']:,.0f} output tok/s, TTFT mean "
                  f"{s['mean_ttft_ms']:.1f} ms, split {s['ttft_split_mean_ms']}", flush=True)
    tok = {k: statistics.median(s["output_throughput"] for s in v) for k, v in got.items()}
    ratio = tok["1P1D cuda-ipc"] / tok["colocated"]
    print(f"ratio output tok/s 1P1D cuda-ipc / colocated (one GPU): {ratio:.3f}  target >= 0.8")
    config = dict(shape=a.shape, num_prompts=a.num_prompts, concurrency=a.concurrency, input_len=a.input_len,
                  output_len=a.output_len, rounds=a.rounds, device=a.device, gpus=1,
                  topology="1P1D: prefill + decode node on one GPU, KV over cuda-ipc; peer: 1 colocated node on it",
                  method="alternating rounds, a fresh cluster each, one at a time; ratio of medians")
    path = write_result(a.result_name, "serving_1p1d_one_gpu", ratio, 0.8, config, commit_id=a.commit,
                        disaggregated=row(got["1P1D cuda-ipc"]), colocated=row(got["colocated"]), work_dir=str(work))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
