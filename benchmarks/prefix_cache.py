"""Prefix caching on one GPU: a multi-turn chat workload (each turn resends the whole
history with the server's answers) served with caching on and off, by a colocated node
and by 1P1D (prefill + decode node sharing the GPU), at the same request rate.

    python benchmarks/prefix_cache.py [--gpu 0] [--shape llama-3.2-1b]
    python benchmarks/prefix_cache.py --device cpu --shape tiny --conversations 4 --turns 3 \\
        --user-len 32 --output-len 8 --request-rate 4      # a smoke run on CPU

Workload (issue 25): --conversations conversations of --turns turns, --user-len new
tokens per turn and --output-len answer tokens, conversations starting at --request-rate
/ turns per second (`pdserve bench --dataset-name multi-turn`); random bf16 weights of
the shape. Each (topology, caching) pair runs on a fresh cluster, one at a time.
ratio = mean TTFT with caching off / on, the lower of the two topologies; target >= 3.
Rows carry the nodes' hit rates and the KV bytes sent per request (1P1D).
--local-prefill-tokens N [N ...] adds 1P1D rows with selective disaggregation at each
threshold (the decode node prefills prompts missing at most N tokens from its cache),
to choose that flag's default."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_config_folder, write_result

KINDS = {"colocated": dict(prefill=0, decode=0, colocated=1), "1P1D": dict(prefill=1, decode=1)}


def bench_one(kind: str, caching: bool, a: argparse.Namespace, model: Path, work: Path, flags: tuple = ()) -> dict:
    from pdserve.cluster import Cluster, ClusterConfig, free_port
    listen = f"127.0.0.1:{free_port()}"
    tag = f"{kind.replace(' ', '_')}_{'on' if caching else 'off'}"
    logs = work / f"logs_{tag}"
    logs.mkdir()
    cluster = Cluster(ClusterConfig(listen=listen, model=str(model), device=a.device, load_format="dummy",
                                    dtype="bfloat16" if a.device == "cuda" else "float32", kv_blocks=a.kv_blocks,
                                    max_num_seqs=a.max_num_seqs, log_dir=str(logs),
                                    node_flags=flags + (() if caching else ("--no-prefix-caching",)),
                                    **KINDS[kind.split()[0]]))
    cluster.start()
    try:
        name = f"bench_{tag}.json"
        subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", listen, "--dataset-name",
                        "multi-turn", "--num-prompts", str(a.conversations), "--multi-turn-turns", str(a.turns),
                        "--multi-turn-user-len", str(a.user_len), "--multi-turn-output-len", str(a.output_len),
                        "--request-rate", str(a.request_rate), "--disable-tqdm", "--save-result",
                        "--result-dir", str(work), "--result-filename", name], check=True, capture_output=True)
        s = json.loads((work / name).read_text())
    finally:
        cluster.stop()
    if s["failed"]:
        raise RuntimeError(f"{tag}: {s['failed']} requests failed: {s['errors'][:3]}")
    return s


def row(s: dict) -> dict:
    cache = s["prefix_cache"]
    first = cache.get("prefill") or cache.get("both") or {}
    n = max(1, s["completed"])
    return dict(mean_ttft_ms=round(s["mean_ttft_ms"], 2), p90_ttft_ms=round(s["p90_ttft_ms"], 2),
                mean_tpot_ms=round(s["mean_tpot_ms"], 3), requests=s["completed"],
                mean_input_len=round(s["total_input_tokens"] / n, 1),
                hit_rate={role: round(c["hit_rate"], 4) for role, c in cache.items()},
                kv_bytes_per_request=round(first.get("kv_bytes_sent", 0) / n),
                ttft_split_mean_ms={k: round(v, 3) for k, v in s["ttft_split_mean_ms"].items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="0", help="the one GPU every node runs on (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--user-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=4.0, help="requests/s (conversations start at rate / turns)")
    ap.add_argument("--kv-blocks", type=int, default=None, help="each node's pool (default: from free memory)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--local-prefill-tokens", type=int, nargs="*", default=[],
                    help="also run 1P1D with the decode node's --local-prefill-tokens at each of these (rows only)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--result-name", default="prefix_cache")
    ap.add_argument("--result-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    a = ap.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = a.gpu
    work = Path(tempfile.mkdtemp(prefix="prefix_cache_"))
    model = write_config_folder(a.shape, work / a.shape)
    rows, ratios = {}, {}
    for kind in KINDS:
        for caching in (True, False):
            s = bench_one(kind, caching, a, model, work)
            rows[f"{kind} caching {'on' if caching else 'off'}"] = r = row(s)
            print(f"{kind:9s} caching {'on ' if caching else 'off'}: TTFT mean {r['mean_ttft_ms']:.1f} ms, "
                  f"hit rate {r['hit_rate']}, KV {r['kv_bytes_per_request']:,} B/request", flush=True)
        ratios[kind] = rows[f"{kind} caching off"]["mean_ttft_ms"] / rows[f"{kind} caching on"]["mean_ttft_ms"]
        print(f"{kind}: mean TTFT off / on = {ratios[kind]:.2f}", flush=True)
    for n in a.local_prefill_tokens:  # selective disaggregation: 1P1D whose decode node prefills short misses
        s = bench_one(f"1P1D local{n}", True, a, model, work, ("--local-prefill-tokens", str(n)))
        rows[f"1P1D caching on, --local-prefill-tokens {n}"] = r = row(s)
        print(f"1P1D --local-prefill-tokens {n}: TTFT mean {r['mean_ttft_ms']:.1f} ms, local prefills "
              f"{s['prefix_cache'].get('decode', {}).get('local_prefills', 0)}", flush=True)
    ratio = min(ratios.values())
    print(f"ratio mean TTFT caching off / on (lower of {', '.join(ratios)}): {ratio:.3f}  target >= 3")
    config = dict(shape=a.shape, conversations=a.conversations, turns=a.turns, user_len=a.user_len,
                  output_len=a.output_len, request_rate=a.request_rate, kv_blocks=a.kv_blocks,
                  max_num_seqs=a.max_num_seqs, device=a.device, gpus=1 if a.device == "cuda" else 0,
                  workload="pdserve bench --dataset-name multi-turn (history + answers resent each turn)",
                  method="fresh cluster per (topology, caching), one at a time; ratio = min over topologies")
    path = write_result(a.result_name, "prefix_cache", ratio, 3.0, config, commit_id=a.commit,
                        folder=Path(a.result_dir) if a.result_dir else None, ratios=ratios, rows=rows,
                        work_dir=str(work))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
