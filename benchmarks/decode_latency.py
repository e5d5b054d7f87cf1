"""Time per decode step against the memory-bandwidth floor, measured in the same run.

    python benchmarks/decode_latency.py [--shape llama-3.2-1b] [--tp 1] [--batches 1 8 32 128] [--context 512]

For each batch size B: B sequences at context --context decode together; the time
per engine step (schedule + forward + sample, CUDA graphs on) is the median over
--steps steps. The floor is the bytes one step must read, weights (every matrix,
the LM head included; the embedding lookup reads a few rows) plus the K/V of the
context, over the device-to-device copy bandwidth measured here (bytes read +
written per second). With TP N each GPU reads 1/N of the weights and
KV, so the floor divides by N. ratio = floor / measured step at batch 1; target 0.5."""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import hf_config, write_config_folder, write_result
from pdserve.common.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.common.sampling import SamplingParams


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (start.elapsed_time(end) / 1e3)


def weight_bytes(cfg, dtype_bytes: int = 2) -> int:
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return (n * per_layer + v * h + h) * dtype_bytes  # + LM head (tied or not, it is read once a step)


def kv_bytes(cfg, batch: int, context: int, dtype_bytes: int = 2) -> int:
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * dtype_bytes * batch * context


def step_times(engine: LLMEngine, batch: int, context: int, steps: int, vocab: int) -> list[float]:
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    seqs = [engine.add_request([rng.randrange(vocab) for _ in range(context - 1)], params) for _ in range(batch)]
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        engine.step()  # prefill
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    for s in seqs:
        engine.abort(s)
    return times


def profile_steps(engine: LLMEngine, context: int, vocab: int, path: Path) -> None:
    """Where a batch-1 step's time goes: host and GPU time per operator over 20 steps."""
    from torch.profiler import ProfilerActivity, profile
    rng = random.Random(0)
    seq = engine.add_request([rng.randrange(vocab) for _ in range(context - 1)],
                             SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    while seq.num_computed_tokens < seq.num_prompt_tokens:
        engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
    engine.abort(seq)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    table += "\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    path.write_text(table)
    print(f"profile -> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("--profile", default=None, help="write a torch profiler table of batch-1 steps to this file")
    args = ap.parse_args()
    cfg = hf_config(args.shape)
    bw = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_folder(args.shape, Path(tmp) / args.shape)
        ecfg = EngineConfig(model=str(folder), tp=args.tp, device="cuda", dtype="bfloat16", load_format="dummy",
                            max_num_seqs=max(args.batches), max_model_len=args.context + args.steps + 64,
                            gpu_memory_utilization=0.5)
        with LLMEngine(ecfg) as engine:
            step_times(engine, 1, 64, 5, cfg.vocab_size)  # warm-up
            for b in args.batches:
                t = statistics.median(step_times(engine, b, args.context, args.steps, cfg.vocab_size))
                floor = (weight_bytes(cfg) + kv_bytes(cfg, b, args.context)) / args.tp / bw
                rows.append(dict(batch=b, step_ms=t * 1e3, floor_ms=floor * 1e3, ratio=floor / t,
                                 tok_per_s=b / t))
                print(f"batch {b:4d}: step {t * 1e3:7.3f} ms   floor {floor * 1e3:7.3f} ms   floor/step {floor / t:5.2f}"
                      f"   {b / t:9.0f} tok/s", flush=True)
            if args.profile:
                profile_steps(engine, args.context, cfg.vocab_size, Path(args.profile))
    ratio = rows[0]["ratio"]
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write); ratio at batch {rows[0]['batch']}: {ratio:.2f}  target 0.5")
    suffix = "" if (args.shape, args.tp) == ("llama-3.2-1b", 1) else f"_{args.shape}_tp{args.tp}"
    config = dict(shape=args.shape, tp=args.tp, context=args.context, batches=args.batches, steps=args.steps,
                  dtype="bfloat16", cuda_graphs=True)
    path = write_result(args.name or f"decode_latency{suffix}", "decode_latency", ratio, 0.5, config,
                        commit_id=args.commit, copy_bandwidth_gbps=bw / 1e9, weight_bytes=weight_bytes(cfg),
                        rows=rows)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
