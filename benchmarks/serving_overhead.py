"""What serving costs over the engine: the same requests offline through
LLMEngine.generate and served through the coordinator to one colocated node, on one
GPU, at each concurrency (256 and 1024 streams by default; offline, max_num_seqs = the
concurrency). Prints both output tok/s and writes results/serving_overhead.json.

    python benchmarks/serving_overhead.py [--concurrency 256 1024] [--num-clients 2]
    python benchmarks/serving_overhead.py --shape tiny --device cpu --num-prompts 32 \\
        --concurrency 8 --input-len 16 --output-len 16     # CPU smoke run

Workload (issue 20): Llama-3.2-1B shape, random bf16 weights, 1024 requests of 128
random prompt tokens and 256 output tokens, ignore_eos; the prompts are the ones
`pdserve bench` samples (seed 0), so both sides run the same requests.
ratio = served / offline output tok/s at the first concurrency (target 0.9). Also per
concurrency: served mean TPOT next to the offline step time (median of the steps that
decode a full batch; target within 10%) and the offline per-request TPOT."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import hf_config, write_config_folder, write_result
from pdserve.bench import sample_requests
from pdserve.cluster import Cluster, ClusterConfig, free_port
from pdserve.common.config import EngineConfig
from pdserve.common.sampling import SamplingParams
from pdserve.engine.llm_engine import LLMEngine

TARGET = 0.9


def prompts(a) -> list[list[int]]:
    """The prompts `pdserve bench` sends for these flags (same sampler, same seed)."""
    ns = argparse.Namespace(dataset_name="random", seed=0, num_prompts=a.num_prompts, random_input_len=a.input_len,
                            random_output_len=a.output_len, random_range_ratio=0.0)
    return [r.prompt for r in sample_requests(ns, hf_config(a.shape).vocab_size, 1 << 30)]


def offline(folder: Path, a, seqs: int, reqs: list[list[int]]) -> dict:
    """LLMEngine.generate's loop, each step timed; output tok/s after a warm-up."""
    cfg = EngineConfig(model=str(folder), device=a.device, dtype=a.dtype, load_format="dummy", max_num_seqs=seqs,
                       max_num_batched_tokens=a.max_num_batched_tokens, gpu_memory_utilization=a.gpu_memory_utilization)
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    with LLMEngine(cfg) as engine:
        engine.generate(reqs[:min(len(reqs), seqs)], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        sync()
        seq_list = [engine.add_request(p, params) for p in reqs]
        steps = []
        t0 = time.perf_counter()
        while any(not s.is_finished for s in seq_list):
            t = time.perf_counter()
            outs = engine.step()
            steps.append((time.perf_counter() - t, len(outs)))
        wall = time.perf_counter() - t0
        done = [engine.completion(s) for s in seq_list]
    del engine
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    tokens = sum(len(c.token_ids) for c in done)
    full = max(n for _, n in steps)
    full_steps = [d for d, n in steps if n == full] or [d for d, _ in steps]
    tpots = [c.timings["tpot_s"] for c in done if c.timings["tpot_s"] is not None]
    return dict(output_tokens=tokens, seconds=wall, output_tok_s=tokens / wall, steps=len(steps), full_batch=full,
                step_ms=1e3 * statistics.median(full_steps), tpot_ms=1e3 * statistics.mean(tpots))


def served(folder: Path, a, streams: int, work: Path) -> dict:
    """A coordinator and one colocated node, `pdserve bench` at `streams` concurrent streams."""
    cfg = ClusterConfig(colocated=1, prefill=0, decode=0, model=str(folder), device=a.device if a.device != "cuda"
                        else "cuda:0", dtype=a.dtype, load_format="dummy", max_num_seqs=streams,
                        max_num_batched_tokens=a.max_num_batched_tokens, max_inflight=streams,
                        listen=f"127.0.0.1:{free_port()}", log_dir=str(work / f"logs_{streams}"),
                        coordinator_flags=("--max-queued", str(a.num_prompts)), switch_interval_us=a.switch_interval_us)
    (work / f"logs_{streams}").mkdir(parents=True, exist_ok=True)
    out = work / f"bench_{streams}.json"

    def bench(n: int, *save: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cfg.listen, "--num-clients",
                               str(a.num_clients), "--num-prompts", str(n), "--max-concurrency", str(streams),
                               "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
                               "--disable-tqdm", *save], capture_output=True, text=True)
    cluster = Cluster(cfg)
    try:
        cluster.start()
        bench(min(streams, a.num_prompts))  # warm-up: CUDA graphs captured, streams open
        r = bench(a.num_prompts, "--save-result", "--result-dir", str(work), "--result-filename", out.name)
        if not out.exists():
            raise RuntimeError(f"bench failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        s = json.loads(out.read_text())
    finally:
        cluster.stop()
    return dict(output_tok_s=s["output_throughput"], completed=s["completed"], failed=s["failed"],
                seconds=s["duration"], tpot_ms=s["mean_tpot_ms"], ttft_ms=s["mean_ttft_ms"],
                first_error=next((e for e in s["errors"] if e), ""))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[256, 1024], help="streams (offline: max_num_seqs)")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--num-clients", type=int, default=2, help="bench client processes")
    ap.add_argument("--switch-interval-us", type=float, default=None, help="every member's (default: theirs)")
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--name", default="serving_overhead", help="result file name")
    a = ap.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    reqs = prompts(a)
    work = Path(tempfile.mkdtemp(prefix="serving_overhead_"))
    folder = write_config_folder(a.shape, work / a.shape)
    rows = []
    for c in a.concurrency:
        off = offline(folder, a, c, reqs)
        print(f"offline  {c:5d} seqs:    {off['output_tok_s']:10,.0f} output tok/s, step {off['step_ms']:.2f} ms "
              f"(batch {off['full_batch']}), TPOT {off['tpot_ms']:.2f} ms", flush=True)
        srv = served(folder, a, c, work)
        print(f"served   {c:5d} streams: {srv['output_tok_s']:10,.0f} output tok/s, TPOT {srv['tpot_ms']:.2f} ms "
              f"({srv['completed']} done, {srv['failed']} failed)", flush=True)
        rows.append(dict(concurrency=c, offline=off, served=srv, ratio=srv["output_tok_s"] / off["output_tok_s"],
                         tpot_over_step=srv["tpot_ms"] / off["step_ms"]))
        print(f"  served / offline tok/s {rows[-1]['ratio']:.3f}; served TPOT / offline step "
              f"{rows[-1]['tpot_over_step']:.3f}", flush=True)
    head = rows[0]
    config = dict(shape=a.shape, device=a.device, dtype=a.dtype, num_prompts=a.num_prompts, input_len=a.input_len,
                  output_len=a.output_len, ignore_eos=True, concurrency=a.concurrency,
                  max_num_batched_tokens=a.max_num_batched_tokens, num_clients=a.num_clients,
                  switch_interval_us=a.switch_interval_us,
                  topology="coordinator (its default workers) + 1 colocated node")
    path = write_result(a.name, "serving_overhead", head["ratio"], TARGET, config, commit_id=a.commit, runs=rows,
                        tpot_over_step=head["tpot_over_step"], tpot_target=1.1)
    print(f"-> {path} (logs in {work})")


if __name__ == "__main__":
    main()
