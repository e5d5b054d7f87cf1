"""`pdserve bench`: serving benchmark against a running coordinator, with goodput.

Flags and result fields follow `vllm bench serve` wherever the concept is the same,
so tools that read one read the other. Requests go out on an absolute schedule whose
gaps are rescaled to exactly n / rate; the rate achieved is recorded. Per request:
TTFT = first token - send, TPOT = (last token - first token) / (output tokens - 1),
ITL = one gap per received chunk, E2EL = last token - send (bench_result.py). A
request attains the SLOs given by --goodput only if it succeeded and meets every one;
goodput = attaining requests / duration."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from pathlib import Path

import numpy as np

from pdserve import bench_prefix
from pdserve.bench_clients import run_clients
from pdserve.bench_openai import add_flags as add_openai_flags
from pdserve.bench_result import Request, jsonable, summarize
from pdserve.bench_stream import arrival_times, benchmark, client_credentials
from pdserve.client import status

SYNTHETIC = {  # name -> (mean input tokens, mean output tokens), lognormal lengths around them
    "chat": (256, 256), "code": (768, 192), "summarization": (1536, 128)}


def sample_requests(a: argparse.Namespace, vocab: int, max_len: int) -> list[Request]:
    rng = random.Random(a.seed)
    if a.dataset_name == "prefix-repetition":
        return bench_prefix.prefix_repetition(a, vocab, max_len)
    if a.dataset_name == "sharegpt":
        data = json.loads(Path(a.dataset_path).read_text())
        out = []
        for item in data:
            turns = item.get("conversations") or item.get("conversation") or []
            if len(turns) < 2:
                continue
            prompt, answer = turns[0]["value"], turns[1]["value"]
            n_in, n_out = max(1, int(len(prompt.split()) * 1.3)), max(1, int(len(answer.split()) * 1.3))
            if n_in + n_out < max_len:
                out.append(Request(prompt, n_in, n_out))
            if len(out) == a.num_prompts:
                break
        return out

    def lengths(mean_in: float, mean_out: float) -> tuple[int, int]:
        if a.dataset_name in SYNTHETIC:
            return (max(4, int(rng.lognormvariate(np.log(mean_in), 0.6))),
                    max(4, int(rng.lognormvariate(np.log(mean_out), 0.6))))
        r = a.random_range_ratio if a.dataset_name == "random" else 0.0
        return (rng.randint(int(mean_in * (1 - r)), int(mean_in * (1 + r))),
                rng.randint(max(1, int(mean_out * (1 - r))), int(mean_out * (1 + r))))

    mean_in, mean_out = SYNTHETIC.get(a.dataset_name, (a.random_input_len, a.random_output_len))
    reqs = []
    for _ in range(a.num_prompts):
        n_in, n_out = lengths(mean_in, mean_out)
        n_in = max(1, min(n_in, max_len - 2))
        n_out = max(1, min(n_out, max_len - n_in))
        reqs.append(Request([rng.randrange(vocab) for _ in range(n_in)], n_in, n_out))
    return reqs


def prompts_at(rate: float, num_prompts: int, duration_s: float, cap: int) -> int:
    """Requests for one run: at least num_prompts, and with duration_s > 0 enough to keep
    arrivals going that long at `rate` (steady state, not one burst), at most cap."""
    if duration_s <= 0 or rate == float("inf"):
        return num_prompts
    return max(num_prompts, min(cap, math.ceil(rate * duration_s)))


def parse_goodput(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise SystemExit(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        slos[name] = float(ms)
    return slos


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=None, help="the coordinator (--backend pdserve)")
    add_openai_flags(p)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset-name", default="random",
                   choices=["random", "fixed", "sharegpt", *SYNTHETIC, *bench_prefix.DATASETS])
    bench_prefix.add_flags(p)
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (with --dataset-name sharegpt)")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate every request's output length (default on; --no-ignore-eos stops at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--model", default=None, help="model name sent with each request (default: the served one)")
    p.add_argument("--num-warmups", type=int, default=0,
                   help="copies of the first request sent before the measured run (not measured)")
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs, e.g. ttft:500 tpot:50 [e2el:MS]")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes the streams and the arrival schedule are spread over")
    p.add_argument("--connections-per-client", type=int, default=0,
                   help="TCP connections each client process spreads its streams over (0: one per 32 of its "
                        "streams, up to 16): a coordinator's --workers share clients by connection")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true",
                   help="also save each request's text, token ids and finish reason (in request order)")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled requests and the arrival schedule")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--sweep", default=None, help="comma-separated request rates: attainment curves + max goodput")
    p.add_argument("--bisect-steps", type=int, default=4, help="bisection steps for the max-goodput rate")
    p.add_argument("--sweep-duration", type=float, default=0.0,
                   help="seconds of arrivals per run: a run at rate R sends max(--num-prompts, R x this) "
                        "requests (at most --sweep-max-prompts); 0 sends --num-prompts at every rate")
    p.add_argument("--sweep-max-prompts", type=int, default=3000)
    p.add_argument("--sweep-extend", type=int, default=2,
                   help="doublings (or halvings) of the rate tried when every swept rate meets (or misses) the SLOs")
    p.add_argument("--slo-scale", default=None,
                   help="comma-separated SLO multipliers: with --sweep, the max goodput at each; "
                        "without, the attainment at --request-rate under each")
    p.add_argument("--headline-scale", type=float, default=1.0,
                   help="the SLO scale whose max goodput is the headline (bisected; added to --slo-scale)")
    p.add_argument("--bisect-all-scales", action="store_true",
                   help="bisect the max goodput at every --slo-scale, not only the headline's")
    p.add_argument("--seeds", type=int, default=1,
                   help="with --sweep: runs per rate, seeds --seed .. --seed+N-1; attainment is their mean, "
                        "their spread is recorded")
    p.add_argument("--label", default=None, help="name on plots and summaries")
    from pdserve.common.config import ClientConfig
    from pdserve.common.flags import add_flags as add_config_flags
    add_config_flags(p.add_argument_group("TLS and API key"), ClientConfig)


def main(a: argparse.Namespace) -> int:
    if a.backend == "openai":  # pdserve/bench_openai.py: an OpenAI-compatible HTTP server
        from pdserve.bench_openai import benchmark as run_benchmark, model_info
        info = model_info(a)
    elif a.coordinator:
        info, run_benchmark = status(a.coordinator, creds=client_credentials(a)), benchmark
    else:
        raise SystemExit("--backend pdserve needs --coordinator")
    a.model_id = a.model or info["model"] or "default"
    if a.connections_per_client < 0:
        raise SystemExit("--connections-per-client must be >= 0")
    if a.num_clients < 1 or (a.num_clients > 1 and a.backend == "openai"):
        raise SystemExit("--num-clients must be >= 1 (1 with --backend openai)")
    if a.backend == "openai" and a.dataset_name == "multi-turn":
        raise SystemExit("--dataset-name multi-turn needs --backend pdserve")
    if a.dataset_name == "sharegpt" and not a.dataset_path:
        raise SystemExit("--dataset-name sharegpt needs --dataset-path")
    slos = parse_goodput(a.goodput)
    vocab, max_len = info["vocab_size"] or 32000, info["max_model_len"] or 4096
    pools: dict[int, list[Request]] = {}  # seed -> requests sampled so far

    def run(args: argparse.Namespace) -> dict:
        n = prompts_at(args.request_rate, args.num_prompts, args.sweep_duration, args.sweep_max_prompts)
        if n > len(pools.get(args.seed, [])):  # same seed: the requests sampled so far stay the first ones
            pools[args.seed] = sample_requests(argparse.Namespace(**{**vars(args), "num_prompts": n}), vocab, max_len)
        reqs = pools[args.seed][:n]
        creds = client_credentials(args) if args.coordinator else None
        before = bench_prefix.node_counters(args.coordinator, creds) if args.coordinator else {}
        schedule = None  # multi-turn: a turn is sent when the previous one ends, on no schedule
        if args.dataset_name == "multi-turn":  # each turn waits for the answer it resends
            reqs, results, duration = asyncio.run(bench_prefix.multi_turn(args, vocab, max_len))
        else:
            schedule = arrival_times(len(reqs), args.request_rate, args.burstiness, args.seed)
            if args.num_clients > 1:
                results, duration = run_clients(args, reqs)
            else:
                results, duration = asyncio.run(run_benchmark(args, reqs))
        report = bench_prefix.cache_report(args.coordinator, before, creds) if args.coordinator else {"prefix_cache": {}}
        return {**summarize(args, reqs, results, duration, slos, schedule), **report}
    if a.sweep or a.slo_scale:
        from pdserve.goodput import run_search
        run_search(a, run, slos)
        return 0
    s = run(a)
    duration = s["duration"]
    print(f"completed {s['completed']}/{s['num_prompts']} in {duration:.2f} s: {s['request_throughput']:.2f} req/s, "
          f"{s['output_throughput']:.1f} output tok/s; arrivals offered at {s['achieved_request_rate']:.2f} req/s "
          f"(asked {a.request_rate:g})")
    for name in a.percentile_metrics.split(","):
        print(f"  {name:5s} mean {s[f'mean_{name}_ms']:9.2f} ms  median {s[f'median_{name}_ms']:9.2f} ms  "
              + "  ".join(f"p{p} {s[f'p{p}_{name}_ms']:9.2f}" for p in a.metric_percentiles.split(",")))
    if slos:
        print(f"  goodput {s['request_goodput']:.2f} req/s, SLO attainment {100 * s['slo_attainment']:.1f}% "
              f"({', '.join(f'{k} <= {v:g} ms' for k, v in slos.items())})")
    if s["ttft_split_mean_ms"]:
        print("  TTFT split (server, mean ms): " + ", ".join(f"{k} {v:.2f}" for k, v in s["ttft_split_mean_ms"].items()))
    for role, c in s["prefix_cache"].items():
        print(f"  prefix cache ({role}): hit rate {100 * c['hit_rate']:.1f}% of {c['query_tokens']} prompt tokens")
    if a.save_result:
        name = a.result_filename or f"pdserve-{a.request_rate}qps-{s['date']}.json"
        path = Path(a.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(s), allow_nan=False))
        print(f"-> {path}")
    return 0 if s["failed"] == 0 else 1
