"""`pdserve bench --backend openai --base-url URL`: the same workloads, SLOs, sweeps and
result JSON against any OpenAI-compatible server (pdserve's HTTP API, vLLM, SGLang).

Each request is a streamed /v1/completions call (prompt as token ids, or text for
ShareGPT), greedy, with `ignore_eos` and `stream_options.include_usage`; it also asks for
`return_token_ids` (vLLM's and pdserve's extension) so that a chunk carrying several
tokens counts them all. TTFT is the first chunk with text or tokens; the output token
count is the server's usage. The server reports no phase times, so there is no TTFT
split. An API key comes from OPENAI_API_KEY, as with the openai client."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from pdserve.bench_stream import Progress, Request, Result, arrival_gaps


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="pdserve", choices=("pdserve", "openai"),
                   help="pdserve: the coordinator's gRPC API (--coordinator); openai: an OpenAI-compatible HTTP "
                        "server (--base-url)")
    p.add_argument("--base-url", default=None, help="with --backend openai: the server, e.g. http://127.0.0.1:8000")


def _headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
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
    r = httpx.get(_root(a) + "/v1/models", headers=_headers(), timeout=30)
    r.raise_for_status()
    cards = r.json().get("data") or []
    if not cards:
        raise SystemExit(f"{a.base_url} serves no model")
    card = cards[0]
    return {"model": card["id"], "vocab_size": card.get("vocab_size") or 0,
            "max_model_len": card.get("max_model_len") or 0}


async def run_one(client, model: str, req: Request, a: argparse.Namespace) -> Result:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "stream": True,
            "temperature": getattr(a, "temperature", 0.0),
            "stream_options": {"include_usage": True}, "ignore_eos": a.ignore_eos, "return_token_ids": True}
    import httpx
    res = Result()
    start = last = time.perf_counter()
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
                            res.itl.append(now - last)
                            res.itl.extend([0.0] * (n - 1))
                        chunks += n
                        last = now
                        res.token_ids.extend(ids or [])
                    text.append(choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
        res.output_tokens = usage["completion_tokens"] if usage else chunks
        res.latency, res.success, res.text = last - start, True, "".join(text)
        res.finish_reason = {"stop": 1, "length": 2}.get(finish, 0)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def benchmark(a: argparse.Namespace, reqs: list[Request]) -> tuple[list[Result], float]:
    """The requests at their arrival times; (results in request order, duration)."""
    import httpx
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=a.max_concurrency or len(reqs) or 1)
    limit = asyncio.Semaphore(a.max_concurrency or len(reqs) or 1)
    gaps = arrival_gaps(len(reqs), a.request_rate, a.burstiness, a.seed)
    progress = Progress(len(reqs), a.disable_tqdm)
    async with httpx.AsyncClient(base_url=_root(a), headers=_headers(), limits=limits) as client:
        async def limited(req: Request) -> Result:
            async with limit:
                r = await run_one(client, a.model_id, req, a)
            progress.update()
            return r
        start = time.perf_counter()
        tasks = []
        for req, gap in zip(reqs, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return list(results), duration
