"""The per-request record every `pdserve bench` backend fills, and the summary built
from the records (vLLM's `vllm bench serve` fields and semantics).

Every backend (the gRPC client in bench_stream, any other protocol) measures each
request into one Result; summarize() is the only place results become numbers, so
every backend's JSON means the same. Times are seconds; arrival_time and start_time
are seconds from the run's start (its first scheduled instant)."""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Request:
    prompt: list[int] | str
    input_len: int                      # sampled prompt length (the server's count replaces it)
    output_len: int                     # max_tokens asked for


@dataclass
class Result:
    success: bool = False
    error: str = ""                     # "" when success; else "CODE: details"
    ttft: float = 0.0                   # send -> first chunk with tokens
    itl: list[float] = field(default_factory=list)  # one gap per later chunk with tokens (vLLM: per chunk)
    latency: float = 0.0                # send -> last chunk (E2EL)
    output_tokens: int = 0              # tokens received (as the server counted them)
    prompt_tokens: int = 0              # the server's prompt token count (0: none came back)
    arrival_time: float = 0.0           # when the schedule released it (s from the run's start)
    start_time: float = 0.0             # when it was sent: arrival + client-side queueing (--max-concurrency)
    text: str = ""
    phases: dict = field(default_factory=dict)      # server-side TTFT split (queue, prefill, transfer, ...)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""             # "stop" | "length" | ""


def jsonable(x):
    """x with every non-finite float as vLLM writes it ("inf", "-inf"; NaN as None), so
    that json.dumps(..., allow_nan=False) gives valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def tpot(r: Result) -> float:
    """(last - first token) / (tokens - 1); 0 for fewer than 2 tokens (vLLM's goodput rule)."""
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets(r: Result, slos: dict[str, float]) -> bool:
    """A request attains the SLOs (ms) only if it succeeded and meets every one."""
    values = {"ttft": r.ttft * 1e3, "tpot": tpot(r) * 1e3, "e2el": r.latency * 1e3}
    return r.success and all(values[k] <= v for k, v in slos.items())


def achieved_rate(results: list[Result]) -> float:
    """Requests / the last arrival's offset: the arrival rate actually offered (the schedule
    puts the last arrival at n / rate); inf when all arrived at once."""
    last = max((r.arrival_time for r in results), default=0.0)
    return len(results) / last if last > 0 else float("inf")


def summarize(a: argparse.Namespace, reqs: list[Request], results: list[Result], duration: float,
              slos: dict[str, float], schedule: list[float] | None = None) -> dict:
    """The run's summary: vLLM's fields, the per-request arrays over ALL requests in
    request order (aligned with `errors`, "" for a success), pdserve's extras."""
    ok = [r for r in results if r.success]
    metrics = {"ttft": [r.ttft for r in ok], "tpot": [tpot(r) for r in ok if r.output_tokens > 1],
               "itl": [x for r in ok for x in r.itl], "e2el": [r.latency for r in ok]}
    input_lens = [r.prompt_tokens or q.input_len for q, r in zip(reqs, results)]
    output_lens = [r.output_tokens if r.success else 0 for r in results]
    in_tokens = sum(n for n, r in zip(input_lens, results) if r.success)
    out_tokens = sum(output_lens)
    good = sum(meets(r, slos) for r in results)
    lag = max((r.arrival_time - t for r, t in zip(results, schedule)), default=0.0) if schedule else 0.0
    s = {"date": time.strftime("%Y%m%d-%H%M%S"), "backend": getattr(a, "backend", "pdserve"),
         "model_id": a.model_id, "num_prompts": len(reqs), "request_rate": a.request_rate,
         "achieved_request_rate": float("inf") if a.request_rate == float("inf") else achieved_rate(results),
         "max_send_lag_s": lag,
         "burstiness": a.burstiness, "seed": a.seed, "max_concurrency": a.max_concurrency,
         "temperature": a.temperature, "ignore_eos": a.ignore_eos, "num_warmups": a.num_warmups,
         "duration": duration, "completed": len(ok), "failed": len(reqs) - len(ok),
         "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
         "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
         "total_token_throughput": (in_tokens + out_tokens) / duration,
         "request_goodput": good / duration if slos else None, "slo_attainment": good / len(reqs) if slos else None,
         "goodput_slos_ms": slos, "num_clients": getattr(a, "num_clients", 1)}
    for name in a.percentile_metrics.split(","):
        values = np.array(metrics[name]) * 1e3 if metrics[name] else np.zeros(1)
        s[f"mean_{name}_ms"] = float(values.mean())
        s[f"median_{name}_ms"] = float(np.median(values))
        s[f"std_{name}_ms"] = float(values.std())
        for p in a.metric_percentiles.split(","):
            s[f"p{p}_{name}_ms"] = float(np.percentile(values, float(p)))
    phases = [r.phases for r in ok if r.phases]
    s["ttft_split_mean_ms"] = {k: 1e3 * float(np.mean([ph[k] for ph in phases])) for k in phases[0]} if phases else {}
    s.update(input_lens=input_lens, output_lens=output_lens, ttfts=[r.ttft for r in results],
             itls=[r.itl for r in results], latencies=[r.latency for r in results],
             arrival_times=[r.arrival_time for r in results], start_times=[r.start_time for r in results],
             errors=[r.error for r in results])
    if getattr(a, "save_detailed", False):
        s.update(generated_texts=[r.text for r in results], output_token_ids=[r.token_ids for r in results],
                 finish_reasons=[r.finish_reason for r in results])
    return s


def first_error(s: dict) -> str:
    return next((e for e in s["errors"] if e), "")
