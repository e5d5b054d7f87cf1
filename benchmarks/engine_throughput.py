"""Engine throughput on nano-vllm's workload, next to transformers' continuous batching.

    python benchmarks/engine_throughput.py [--shape llama-3.2-1b] [--tp 1] [--num-seqs 256]

Workload (nano-vllm's bench): num_seqs prompts of random token ids, input and output
lengths uniform in [100, 1024], ignore_eos, seed 0, random bf16 weights of the shape.
Ours: output tokens / wall time of LLMEngine.generate after a warm-up. Transformers:
`generate_batch` (its continuous-batching API) on the same model shape, same prompts,
same GPU, in the same run. generate_batch takes one max_new_tokens for all requests,
so it runs the same prompts with --hf-max-new-tokens each (shorter outputs than ours
on average: shorter contexts favour it, so the ratio is conservative).
ratio = ours / transformers output tokens per second; target 10."""
from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from pathlib import Path

import torch

from common import hf_config, write_config_folder, write_result
from pdserve.common.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.common.sampling import SamplingParams


def workload(n: int, vocab: int, lo: int, hi: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outputs = [rng.randint(lo, hi) for _ in range(n)]
    return prompts, outputs


def run_ours(folder: Path, args, tp: int, prompts, outputs) -> dict:
    cfg = EngineConfig(model=str(folder), tp=tp, device=args.device, dtype="bfloat16", load_format="dummy",
                       max_num_seqs=args.num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, gpu_memory_utilization=0.85,
                       prefill_graphs=not args.no_prefill_graphs)
    t0 = time.perf_counter()
    with LLMEngine(cfg) as engine:
        start_s = time.perf_counter() - t0
        engine.generate([prompts[0][:64]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.perf_counter()
        done = engine.generate(prompts, params)
        wall = time.perf_counter() - t
        blocks = engine.blocks.num_blocks
    del engine
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    tokens = sum(len(c.token_ids) for c in done)
    assert tokens == sum(outputs)
    return dict(tp=tp, output_tokens=tokens, seconds=wall, tok_per_s=tokens / wall, start_s=start_s, kv_blocks=blocks)


def run_hf(args, prompts) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(hf_config(args.shape), dtype=torch.bfloat16).eval()
    gen = GenerationConfig(max_new_tokens=args.hf_max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    model.generate_batch(inputs=[p[:64] for p in prompts[:8]], generation_config=gen)  # warm-up
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen)
    wall = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in out.values())
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dict(output_tokens=tokens, seconds=wall, tok_per_s=tokens / wall, max_new_tokens=args.hf_max_new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1],
                    help="TP sizes to run ours at (the ratio uses the last; more than one adds the scaling)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--hf-max-new-tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true", help="ours only (no ratio is written)")
    ap.add_argument("--no-prefill-graphs", action="store_true", help="steps with prompt tokens run eagerly")
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--name", default=None, help="result file name (default engine_throughput[_SHAPE_tpN])")
    args = ap.parse_args()
    vocab = hf_config(args.shape).vocab_size
    prompts, outputs = workload(args.num_seqs, vocab, args.min_len, args.max_len)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_folder(args.shape, Path(tmp) / args.shape)
        for tp in args.tp:
            runs.append(run_ours(folder, args, tp, prompts, outputs))
            r = runs[-1]
            print(f"pdserve tp{tp}  {r['output_tokens']:8d} tokens in {r['seconds']:7.2f} s = {r['tok_per_s']:9.0f} tok/s",
                  flush=True)
    ours = runs[-1]
    scaling = {f"tp{r['tp']}_over_tp{runs[0]['tp']}": r["tok_per_s"] / runs[0]["tok_per_s"] for r in runs[1:]}
    for k, v in scaling.items():
        print(f"throughput {k}: {v:.2f}")
    if args.skip_hf:
        return
    hf = run_hf(args, prompts)
    print(f"transformers {hf['output_tokens']:8d} tokens in {hf['seconds']:7.2f} s = {hf['tok_per_s']:9.0f} tok/s")
    ratio = ours["tok_per_s"] / hf["tok_per_s"]
    print(f"ratio (ours / transformers generate_batch): {ratio:.2f}  target 10")
    tp = args.tp[-1]
    suffix = "" if (args.shape, tp) == ("llama-3.2-1b", 1) else f"_{args.shape}_tp{tp}"
    config = dict(shape=args.shape, tp=tp, tp_runs=args.tp, num_seqs=args.num_seqs, input_len=[args.min_len, args.max_len],
                  output_len=[args.min_len, args.max_len], ignore_eos=True, seed=0, dtype="bfloat16",
                  max_num_batched_tokens=args.max_num_batched_tokens, hf_max_new_tokens=args.hf_max_new_tokens)
    path = write_result(args.name or f"engine_throughput{suffix}", "engine_throughput", ratio, 10.0, config,
                        commit_id=args.commit, ours=ours, transformers=hf,
                        ours_by_tp=runs, tp_scaling=scaling)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
