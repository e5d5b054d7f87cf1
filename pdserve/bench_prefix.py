"""`pdserve bench` workloads that repeat themselves, for prefix caching, and the
nodes' cache hit rate reported beside TTFT.

    prefix-repetition  --num-prompts requests, each one of --prefix-repetition-num-prefixes
                       shared prefixes of --prefix-repetition-prefix-len tokens followed by
                       its own --prefix-repetition-suffix-len tokens (vLLM's dataset of the name)
    multi-turn         --num-prompts conversations of --multi-turn-turns turns; a turn's
                       prompt is the whole history (earlier prompts and the answers the
                       server gave) plus --multi-turn-user-len new tokens, sent once the
                       previous turn has ended. Conversations start at --request-rate /
                       turns per second, so requests arrive at about --request-rate.

Token ids are random (the model's vocabulary), so any checkpoint serves them."""
from __future__ import annotations

import argparse
import asyncio
import random
import time

import numpy as np

from pdserve.bench_result import Request, Result
from pdserve.bench_stream import client_credentials, run_one
from pdserve.client import status
from pdserve.wire.rpc import channel
from pdserve.v1 import api_pb2_grpc

DATASETS = ("prefix-repetition", "multi-turn")


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    p.add_argument("--prefix-repetition-output-len", type=int, default=128)
    p.add_argument("--multi-turn-turns", type=int, default=8)
    p.add_argument("--multi-turn-user-len", type=int, default=512, help="new tokens per turn")
    p.add_argument("--multi-turn-output-len", type=int, default=64, help="answer tokens per turn")


def prefix_repetition(a: argparse.Namespace, vocab: int, max_len: int) -> list[Request]:
    rng = random.Random(a.seed)
    p, s, out = a.prefix_repetition_prefix_len, a.prefix_repetition_suffix_len, a.prefix_repetition_output_len
    if p + s + out > max_len:
        raise SystemExit(f"prefix {p} + suffix {s} + output {out} tokens exceed the model's {max_len}")
    prefixes = [[rng.randrange(vocab) for _ in range(p)] for _ in range(a.prefix_repetition_num_prefixes)]
    reqs = [Request(rng.choice(prefixes) + [rng.randrange(vocab) for _ in range(s)], p + s, out)
            for _ in range(a.num_prompts)]
    return reqs


async def multi_turn(a: argparse.Namespace, vocab: int, max_len: int) -> tuple[list[Request], list[Result], float]:
    """Run the conversations; the requests as sent (prompt lengths known only as the
    answers come) and their results, conversation by conversation, and the duration."""
    turns, user, out = a.multi_turn_turns, a.multi_turn_user_len, a.multi_turn_output_len
    ch = channel(a.coordinator, client_credentials(a))
    stub = api_pb2_grpc.GenerationStub(ch)
    limit = asyncio.Semaphore(a.max_concurrency or a.num_prompts or 1)
    rate = a.request_rate / max(1, turns)
    gaps = ([0.0] * a.num_prompts if rate == float("inf") else  # gamma gaps, Poisson at burstiness 1
            np.random.default_rng(a.seed).gamma(a.burstiness, 1.0 / (rate * a.burstiness), a.num_prompts).tolist())

    async def conversation(c: int) -> list[tuple[Request, Result]]:
        rng = random.Random(a.seed * 1_000_003 + c)
        history: list[int] = []
        done = []
        async with limit:
            for _ in range(turns):
                prompt = history + [rng.randrange(vocab) for _ in range(user)]
                if len(prompt) + out > max_len:
                    break
                req = Request(prompt, len(prompt), out)
                res = await run_one(stub, req, a, start)
                res.arrival_time = res.start_time  # sent once the previous turn ended
                done.append((req, res))
                if not res.success:
                    break
                history = prompt + res.token_ids
        return done
    start = time.perf_counter()
    tasks = []
    for c, gap in enumerate(gaps):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(conversation(c)))
    pairs = [p for conv in await asyncio.gather(*tasks) for p in conv]
    duration = time.perf_counter() - start
    await ch.close()
    return [q for q, _ in pairs], [r for _, r in pairs], duration


def node_counters(coordinator: str, creds=None) -> dict[str, dict]:
    kw = {"creds": creds} if creds is not None else {}
    return {n["id"]: dict(n["counters"], role=n["role"]) for n in status(coordinator, **kw)["nodes"]}


def cache_report(coordinator: str, before: dict[str, dict], creds=None, settle_s: float = 1.0) -> dict:
    """The nodes' prefix-cache hit rate and KV sent during a run (counters come with
    heartbeats: settle_s lets the last ones arrive). Per role: prompt tokens looked up,
    found cached, hit rate; per request figures are left to the caller."""
    time.sleep(settle_s)
    after = node_counters(coordinator, creds)
    out: dict = {}
    for nid, c in after.items():
        b = before.get(nid, {})
        role = out.setdefault(c["role"], dict(query_tokens=0, hit_tokens=0, kv_bytes_sent=0, kv_blocks_sent=0,
                                               kv_transfers_sent=0, evicted_blocks=0, local_prefills=0))
        for key, name in (("query_tokens", "prefix_query_tokens"), ("hit_tokens", "prefix_hit_tokens"),
                          ("kv_bytes_sent", "kv_bytes_sent"), ("kv_blocks_sent", "kv_blocks_sent"),
                          ("kv_transfers_sent", "kv_transfers_sent"), ("evicted_blocks", "prefix_evicted_blocks"),
                          ("local_prefills", "local_prefills")):
            role[key] += c[name] - b.get(name, 0)
    for role in out.values():
        role["hit_rate"] = role["hit_tokens"] / role["query_tokens"] if role["query_tokens"] else 0.0
    return {"prefix_cache": out}
