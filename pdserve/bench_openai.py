"""`pdserve bench --backend openai --base-url URL`: the same workloads, SLOs, sweeps and
result JSON against any OpenAI-compatible server (pdserve's HTTP API, vLLM, SGLang).

Each request is a streamed /v1/completions call (prompt as token ids, or text for
ShareGPT) with the run's temperature, `ignore_eos` and `stream_options.include_usage`;
it also asks for `return_token_ids` (vLLM's and pdserve's extension) so the token ids
come back. Requests are measured into bench_result's Result like the gRPC backend's
(bench_stream.py): the same absolute schedule, one ITL per chunk with tokens, the
server's usage for the token counts, finish_reason by name. The server reports no phase
times, so there is no TTFT split. The API key is --api-key (or --api-key-file), else
OPENAI_API_KEY as with the openai client."""
from __future__ import annotations

import argparse
import json
import os
import time

from pdserve.bench_result import Request, Result
from pdserve.bench_stream import client_credentials, run_schedule


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="pdserve", choices=("pdserve", "openai"),
                   help="pdserve: the coordinator's gRPC API (--coordinator); openai: an OpenAI-compatible HTTP "
                        "server (--base-url)")
    p.add_argument("--base-url", default=None, help="with --backend openai: the server, e.g. http://127.0.0.1:8000")


def _headers(a: argparse.Namespace) -> dict[str, str]:
    key = client_credentials(a).api_key or os.environ.get("OPENAI_API_KEY")  # --api-key(-file) first
    return {"Authorization": f"Bearer {key}"} if key else {}


def _root(a: argparse.Namespace) -> str:
    if not a.base_url:
        raise SystemExit("--backend openai needs --base-url")
    url = a.base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def model_info(a: argparse.Namespace) -> dict:
    """What `pdserve status` gives the gRPC backend, from GET /v1/models: the model (the
    first listed), its context and vocabulary where the server says (vLLM: max_model_len)."""
    import httpx
    r = httpx.get(_root(a) + "/v1/models", headers=_headers(a), timeout=30)
    r.raise_for_status()
    cards = r.json().get("data") or []
    if not cards:
        raise SystemExit(f"{a.base_url} serves no model")
    card = cards[0]
    return {"model": card["id"], "vocab_size": card.get("vocab_size") or 0,
            "max_model_len": card.get("max_model_len") or 0}


async def run_one(client, req: Request, a: argparse.Namespace, t0: float = 0.0) -> Result:
    """One request's stream; t0: the run's start on this process's perf_counter clock."""
    import httpx
    body = {"model": a.model_id, "prompt": req.prompt, "max_tokens": req.output_len, "stream": True,
            "temperature": a.temperature, "stream_options": {"include_usage": True}, "ignore_eos": a.ignore_eos,
            "return_token_ids": True}
    res = Result()
    start = last = time.perf_counter()
    res.start_time = start - t0
    text, chunks, usage, finish = [], 0, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=a.request_timeout) as r:
            if r.status_code != 200:
                err = json.loads(await r.aread() or b"{}").get("error", {})
                raise ValueError(f"HTTP {r.status_code}: {err.get('message', '')}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    raise ValueError(f"error in the stream: {event['error'].get('message', '')}")
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    ids = choice.get("token_ids")
                    n = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                    if n:
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)  # one gap per chunk, however many tokens it carries
                        chunks += n
                        last = now
                        res.token_ids.extend(ids or [])
                    text.append(choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
        res.output_tokens = usage["completion_tokens"] if usage else chunks
        res.prompt_tokens = usage.get("prompt_tokens") or 0 if usage else 0
        res.latency, res.success, res.text = last - start, True, "".join(text)
        res.finish_reason = finish if finish in ("stop", "length") else ""
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    if not res.success and not res.error:
        res.error = "failed"
    return res


async def benchmark(a: argparse.Namespace, reqs: list[Request]) -> tuple[list[Result], float]:
    """(results in request order, seconds from the run's start to the last completion):
    bench_stream's schedule and warm-ups, each request a streamed /v1/completions call."""
    import httpx
    n = a.max_concurrency or len(reqs) or 1
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=_root(a), headers=_headers(a), limits=limits) as client:
        return await run_schedule(a, reqs, lambda req, t0: run_one(client, req, a, t0))
