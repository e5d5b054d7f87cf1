"""Served throughput of this tree against another tree of the project (the peer), on
the same GPU in one run: a coordinator and one colocated node per round, driven by
`pdserve bench` at many concurrent streams, rounds alternating between the trees.
Prints the ratio of output tok/s (this tree / the other) and writes served_ab.json.

    python benchmarks/served_ab.py --other PATH_TO_OTHER_TREE --other-commit SHA [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_config_folder, write_result
from pdserve.cluster import free_port


def serve_and_bench(tree: Path, model: Path, a, out: Path) -> dict:
    """One round: coordinator + colocated node from `tree`, then bench; the bench's summary."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    listen = f"127.0.0.1:{free_port()}"
    py = [sys.executable, "-m", "pdserve"]
    procs = [subprocess.Popen(py + ["coordinator", "--listen", listen], cwd=tree, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(py + ["node", "--role", "both", "--coordinator", listen, "--model", str(model),
                                        "--device", "cuda:0", "--dtype", "bfloat16", "--load-format", "dummy",
                                        "--max-num-seqs", str(a.concurrency)], cwd=tree, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 300
        while True:
            r = subprocess.run(py + ["status", "--coordinator", listen, "--json"], cwd=tree, env=env,
                               capture_output=True, text=True)
            if r.returncode == 0 and any(n["healthy"] for n in json.loads(r.stdout)["nodes"]):
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{tree}: the cluster did not start")
            time.sleep(1)
        name = f"bench_{len(list(out.glob('bench_*.json')))}.json"
        subprocess.run(py + ["bench", "--coordinator", listen, "--num-prompts", str(a.num_prompts),
                             "--max-concurrency", str(a.concurrency), "--random-input-len", str(a.input_len),
                             "--random-output-len", str(a.output_len), "--disable-tqdm", "--save-result",
                             "--result-dir", str(out), "--result-filename", name],
                       cwd=tree, env=env, check=True, capture_output=True)
        return json.loads((out / name).read_text())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def find_throughput(summary: dict) -> float:
    return summary.get("output_throughput") or summary["summary"]["output_throughput"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="the peer tree (e.g. the commit before a change)")
    ap.add_argument("--other-commit", required=True)
    ap.add_argument("--commit", default=None, help="this tree's commit (where it has no .git)")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    a = ap.parse_args()
    here, other = Path(__file__).resolve().parent.parent, Path(a.other).resolve()
    work = Path(tempfile.mkdtemp(prefix="served_ab_"))
    model = write_config_folder(a.shape, work / a.shape)
    ours, theirs = [], []
    for i in range(a.rounds):  # alternate, other first: neither side always runs on a warmer host
        theirs.append(find_throughput(serve_and_bench(other, model, a, work)))
        ours.append(find_throughput(serve_and_bench(here, model, a, work)))
        print(f"round {i}: this tree {ours[-1]:,.0f} output tok/s, other {theirs[-1]:,.0f}", flush=True)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"served output tok/s, this tree / {a.other_commit[:7]}: {ratio:.3f}")
    path = write_result("served_ab", "served_ab", ratio, 1.0,
                        dict(shape=a.shape, num_prompts=a.num_prompts, concurrency=a.concurrency,
                             input_len=a.input_len, output_len=a.output_len, rounds=a.rounds,
                             topology="coordinator + 1 colocated node, cuda:0", other_commit=a.other_commit),
                        commit_id=a.commit, ours_tok_s=ours, other_tok_s=theirs)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
