"""Engine throughput next to transformers' continuous batching, on one workload.

    python benchmarks/engine_throughput.py [--shape llama-3.2-1b] [--tp 1 [2]] [--num-seqs 256] [--output-len 256]

Workload: num_seqs prompts of random token ids with lengths uniform in
[--min-len, --max-len] (nano-vllm's prompts, seed 0), each generating exactly
--output-len tokens (ignore_eos; transformers' generate_batch takes one
max_new_tokens for all, so both sides run that one length), random bf16 weights of
the shape. Ours: output tokens / wall time of LLMEngine.generate after a warm-up, at
each --tp. Transformers: `generate_batch` on one GPU, same prompts, same lengths, in
the same run. ratio = ours at TP 1 / transformers output tokens per second (one GPU
each; target 10); at TP N the JSON has ours per GPU (tok/s / N) and its ratio per
GPU beside the whole-device figure. --nano-vllm-outputs also runs ours with nano-vllm's
output lengths (uniform in the prompt range) as a second figure with no ratio."""
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
    """nano-vllm's prompts and output lengths (the prompts do not depend on the lengths)."""
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
    gen = GenerationConfig(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=[p[:64] for p in prompts[:8]], generation_config=gen)  # warm-up
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen)
    wall = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in out.values())
    assert tokens == len(prompts) * args.output_len, "transformers did not generate the asked lengths"
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dict(output_tokens=tokens, seconds=wall, tok_per_s=tokens / wall, max_new_tokens=args.output_len)


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
    ap.add_argument("--output-len", type=int, default=256, help="tokens every request generates, on both sides")
    ap.add_argument("--nano-vllm-outputs", action="store_true",
                    help="also run ours with nano-vllm's output lengths (a second figure, no ratio)")
    ap.add_argument("--skip-hf", action="store_true", help="ours only (no ratio is written)")
    ap.add_argument("--no-prefill-graphs", action="store_true", help="steps with prompt tokens run eagerly")
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--name", default=None, help="result file name (default engine_throughput[_SHAPE_tpN])")
    args = ap.parse_args()
    vocab = hf_config(args.shape).vocab_size
    prompts, nano_outputs = workload(args.num_seqs, vocab, args.min_len, args.max_len)
    outputs = [args.output_len] * len(prompts)  # the one length transformers' batch API runs
    runs, nano = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_folder(args.shape, Path(tmp) / args.shape)
        for tp in args.tp:
            r = run_ours(folder, args, tp, prompts, outputs)
            r["tok_per_s_per_gpu"] = r["tok_per_s"] / tp
            runs.append(r)
            print(f"pdserve tp{tp}  {r['output_tokens']:8d} tokens in {r['seconds']:7.2f} s = {r['tok_per_s']:9.0f} tok/s "
                  f"({r['tok_per_s_per_gpu']:.0f} per GPU)", flush=True)
        if args.nano_vllm_outputs:
            nano = run_ours(folder, args, args.tp[0], prompts, nano_outputs)
            print(f"pdserve tp{args.tp[0]} on nano-vllm's output lengths: {nano['tok_per_s']:9.0f} tok/s", flush=True)
    scaling = {f"tp{r['tp']}_over_tp{runs[0]['tp']}": r["tok_per_s"] / runs[0]["tok_per_s"] for r in runs[1:]}
    for k, v in scaling.items():
        print(f"throughput {k}: {v:.2f}")
    if args.skip_hf:
        return
    hf = run_hf(args, prompts)
    print(f"transformers {hf['output_tokens']:8d} tokens in {hf['seconds']:7.2f} s = {hf['tok_per_s']:9.0f} tok/s (one GPU)")
    for r in runs:
        r["ratio"] = r["tok_per_s"] / hf["tok_per_s"]
        r["ratio_per_gpu"] = r["tok_per_s_per_gpu"] / hf["tok_per_s"]
        print(f"ratio at TP {r['tp']} (ours / transformers): {r['ratio']:.2f}, per GPU {r['ratio_per_gpu']:.2f}")
    # the headline compares one GPU with one GPU: TP 1 where it ran, else the smallest TP per GPU
    head = min(runs, key=lambda r: r["tp"])
    ratio, ratio_is = (head["ratio"], "TP 1, one GPU each") if head["tp"] == 1 else \
        (head["ratio_per_gpu"], f"TP {head['tp']} per GPU against transformers on one GPU")
    print(f"ratio ({ratio_is}): {ratio:.2f}  target 10")
    tp = args.tp[-1]
    suffix = "" if (args.shape, tp) == ("llama-3.2-1b", 1) else f"_{args.shape}_tp{tp}"
    config = dict(shape=args.shape, tp=head["tp"], tp_runs=args.tp, num_seqs=args.num_seqs,
                  input_len=[args.min_len, args.max_len], output_len=args.output_len, same_workload=True,
                  ignore_eos=True, seed=0, dtype="bfloat16", max_num_batched_tokens=args.max_num_batched_tokens,
                  ratio_is=ratio_is)
    path = write_result(args.name or f"engine_throughput{suffix}", "engine_throughput", ratio, 10.0, config,
                        commit_id=args.commit, ours=head, transformers=hf, ours_by_tp=runs, tp_scaling=scaling,
                        ours_nano_vllm_outputs=nano)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
