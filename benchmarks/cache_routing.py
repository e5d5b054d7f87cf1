"""Cache-aware routing against round-robin: two prefill nodes and one decode node, a
shared-prefix workload whose prefixes fit the two prefill nodes' caches together but
not one node's alone, the same request rate and SLOs for both policies.

    python benchmarks/cache_routing.py [--gpu 0] [--shape llama-3.2-1b]
    python benchmarks/cache_routing.py --device cpu --shape tiny --num-prompts 24 --num-prefixes 4 \\
        --prefix-len 64 --suffix-len 16 --output-len 8 --prefill-kv-blocks 12 --decode-kv-blocks 256 \\
        --request-rate 8 --goodput ttft:2000 tpot:500          # a smoke run on CPU

All three nodes share one GPU (random bf16 weights of the shape; on an H100 a 1B shape
leaves room for three), KV over cuda-ipc; each prefill node's pool is --prefill-kv-blocks
(default: half the prefixes' blocks and a quarter more). The workload is `pdserve bench
--dataset-name prefix-repetition`. Each policy runs on a fresh cluster, the order
alternating between rounds. ratio = goodput (requests/s meeting every SLO, at
--request-rate) cache-aware / round-robin, medians over rounds; target >= 1.5."""
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

POLICIES = ("cache-aware", "round-robin")


def start(policy: str, a: argparse.Namespace, model: Path, logs: Path):
    """The decode node with the coordinator, then the two prefill nodes with their own pools."""
    from pdserve.cluster import Cluster, ClusterConfig, free_port
    listen = f"127.0.0.1:{free_port()}"
    device = f"cuda:{0}" if a.device == "cuda" else "cpu"
    common = dict(listen=listen, model=str(model), device=device, load_format="dummy", log_dir=str(logs),
                  dtype="bfloat16" if a.device == "cuda" else "float32", max_num_seqs=a.max_num_seqs,
                  kv_transport="cuda-ipc" if a.device == "cuda" else "zmq")
    decode = Cluster(ClusterConfig(prefill=0, decode=1, kv_blocks=a.decode_kv_blocks,
                                   coordinator_flags=("--routing", policy), **common))
    prefill = Cluster(ClusterConfig(prefill=2, decode=0, kv_blocks=a.prefill_kv_blocks, coordinator=False, **common))
    decode.start()
    try:
        prefill.start()
        prefill._wait_ready(3)
    except BaseException:
        prefill.stop()
        decode.stop()
        raise
    return listen, (prefill, decode)


def bench_one(policy: str, a: argparse.Namespace, model: Path, work: Path) -> dict:
    logs = work / f"logs_{policy}_{len(list(work.glob('logs_*')))}"
    logs.mkdir()
    listen, clusters = start(policy, a, model, logs)
    try:
        name = f"bench_{len(list(work.glob('bench_*.json')))}.json"
        subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", listen, "--dataset-name",
                        "prefix-repetition", "--num-prompts", str(a.num_prompts), "--prefix-repetition-prefix-len",
                        str(a.prefix_len), "--prefix-repetition-suffix-len", str(a.suffix_len),
                        "--prefix-repetition-num-prefixes", str(a.num_prefixes), "--prefix-repetition-output-len",
                        str(a.output_len), "--request-rate", str(a.request_rate), "--goodput", *a.goodput,
                        "--seed", str(a.seed), "--disable-tqdm", "--save-result", "--result-dir", str(work),
                        "--result-filename", name], check=True, capture_output=True)
        s = json.loads((work / name).read_text())
    finally:
        for c in clusters:
            c.stop()
    if s["failed"]:
        raise RuntimeError(f"{policy}: {s['failed']} requests failed: {s['errors'][:3]}")
    return s


def row(runs: list[dict]) -> dict:
    return dict(goodput=[round(s["request_goodput"], 3) for s in runs],
                slo_attainment=[round(s["slo_attainment"], 3) for s in runs],
                mean_ttft_ms=[round(s["mean_ttft_ms"], 2) for s in runs],
                mean_tpot_ms=[round(s["mean_tpot_ms"], 3) for s in runs],
                prefill_hit_rate=[round(s["prefix_cache"].get("prefill", {}).get("hit_rate", 0.0), 4) for s in runs],
                prefill_evicted_blocks=[s["prefix_cache"].get("prefill", {}).get("evicted_blocks", 0) for s in runs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="0", help="the one GPU every node runs on (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--num-prefixes", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=2048)
    ap.add_argument("--suffix-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16, help="the nodes' (default) block size, to size the pools")
    ap.add_argument("--prefill-kv-blocks", type=int, default=None,
                    help="each prefill node's pool (default: half the prefixes' blocks, and a quarter more)")
    ap.add_argument("--decode-kv-blocks", type=int, default=None, help="the decode node's pool (default: from memory)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=8.0)
    ap.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:50"], help="SLOs, as pdserve bench takes them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--result-name", default="cache_routing")
    ap.add_argument("--result-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    a = ap.parse_args()
    if a.prefill_kv_blocks is None:
        per_prefix = -(-(a.prefix_len + a.suffix_len) // a.block_size)
        a.prefill_kv_blocks = int(a.num_prefixes * per_prefix / 2 * 1.25)
    os.environ["CUDA_VISIBLE_DEVICES"] = a.gpu
    work = Path(tempfile.mkdtemp(prefix="cache_routing_"))
    model = write_config_folder(a.shape, work / a.shape)
    got: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for r in range(a.rounds):
        for policy in (POLICIES if r % 2 == 0 else POLICIES[::-1]):
            s = bench_one(policy, a, model, work)
            got[policy].append(s)
            print(f"round {r} {policy:12s}: goodput {s['request_goodput']:.2f} req/s (attainment "
                  f"{100 * s['slo_attainment']:.0f}%), TTFT mean {s['mean_ttft_ms']:.1f} ms, prefill hit rate "
                  f"{s['prefix_cache'].get('prefill', {}).get('hit_rate', 0.0):.2f}", flush=True)
    good = {p: statistics.median(s["request_goodput"] for s in v) for p, v in got.items()}
    ratio = good["cache-aware"] / good["round-robin"] if good["round-robin"] else float("inf")
    print(f"ratio goodput cache-aware / round-robin: {ratio:.3f}  target >= 1.5")
    config = dict(shape=a.shape, num_prompts=a.num_prompts, num_prefixes=a.num_prefixes, prefix_len=a.prefix_len,
                  suffix_len=a.suffix_len, output_len=a.output_len, request_rate=a.request_rate, goodput=a.goodput,
                  prefill_kv_blocks=a.prefill_kv_blocks, decode_kv_blocks=a.decode_kv_blocks, rounds=a.rounds,
                  device=a.device, gpus=1 if a.device == "cuda" else 0,
                  topology="2 prefill + 1 decode node, all on one GPU (cuda-ipc); zmq on CPU",
                  method="fresh cluster per run, policies alternating; ratio of median goodput at one rate")
    path = write_result(a.result_name, "cache_routing", None if ratio == float("inf") else ratio, 1.5, config,
                        commit_id=a.commit, folder=Path(a.result_dir) if a.result_dir else None,
                        **{p.replace("-", "_"): row(v) for p, v in got.items()}, work_dir=str(work))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
