"""One benchmark client: the requests' streams on one event loop, sent on an absolute
schedule, each measured into a Result (pdserve bench runs one of these, or several in
processes: bench_clients)."""
from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from typing import Awaitable, Callable

import grpc
import numpy as np

from pdserve.bench_result import Request, Result
from pdserve.client import FINISH_NAMES
from pdserve.wire.rpc import channel
from pdserve.v1 import api_pb2, api_pb2_grpc


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send instants (s from the run's start) of n requests: gamma gaps (Poisson when
    burstiness = 1) summed, then rescaled so the last lands at exactly n / rate, as vLLM
    does (the rate offered is the rate asked for, whatever the draw); all 0 at rate inf."""
    if rate == float("inf") or n == 0:
        return [0.0] * n
    times = np.cumsum(np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n))
    return list(times * (n / rate / times[-1]))


async def run_one(stub, req: Request, a: argparse.Namespace, t0: float = 0.0) -> Result:
    """One request's stream; t0: the run's start on this process's perf_counter clock."""
    sampling = api_pb2.SamplingParams(max_tokens=req.output_len, temperature=a.temperature, ignore_eos=a.ignore_eos)
    msg = api_pb2.GenerateRequest(sampling=sampling, model=getattr(a, "model", None) or "")
    if isinstance(req.prompt, str):
        msg.text = req.prompt.encode()
    else:
        msg.token_ids.ids.extend(req.prompt)
    res = Result()
    start = last = time.perf_counter()
    res.start_time = start - t0
    text = []
    try:
        async for resp in stub.Generate(msg, timeout=a.request_timeout):
            now = time.perf_counter()
            if resp.prompt_tokens:
                res.prompt_tokens = resp.prompt_tokens
            if resp.token_ids:
                if resp.index != res.output_tokens:
                    raise IndexError(f"token index {resp.index} after {res.output_tokens} tokens")
                res.token_ids.extend(resp.token_ids)
                if res.output_tokens == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)  # one gap per chunk, however many tokens it carries
                res.output_tokens += len(resp.token_ids)
                last = now
            text.append(resp.text)
            if resp.finish_reason:
                res.finish_reason = FINISH_NAMES.get(resp.finish_reason, "")
                t = resp.times
                res.phases = {"queue": t.reserved - t.received, "prefill": t.prefill_end - t.prefill_start,
                              "transfer": max(0.0, t.transfer_end - t.prefill_end) if t.transfer_end else 0.0,
                              "decode_admission": max(0.0, t.decode_start - (t.transfer_end or t.prefill_end))
                              if t.decode_start else 0.0}
        res.latency, res.success, res.text = last - start, True, "".join(text)
    except grpc.aio.AioRpcError as e:
        res.error = f"{e.code().name}: {e.details()}"
    except IndexError as e:
        res.error = f"bad stream: {e}"
    if not res.success and not res.error:
        res.error = "failed"
    return res


def client_tls(a: argparse.Namespace) -> dict:
    """The ClientConfig fields of the bench flags (absent ones: None)."""
    return {k: getattr(a, k, None) for k in ("tls_cert", "tls_key", "tls_ca", "tls_server_name", "api_key",
                                             "api_key_file")}


def client_credentials(a: argparse.Namespace):
    """The bench clients' credentials from their flags (TLS files, API key)."""
    from pdserve.common.config import ClientConfig
    from pdserve.wire.security import Credentials
    return Credentials.client(ClientConfig(**client_tls(a)))


def connections(a: argparse.Namespace, streams: int) -> int:
    """--connections-per-client, or by default one per 32 of this client's streams (1 to 16)."""
    return getattr(a, "connections_per_client", 0) or max(1, min(16, -(-streams // 32)))


def open_channels(address: str, creds, n: int) -> list:
    """n channels to address, each on its own TCP connection where n > 1."""
    return [channel(address, creds, own_connection=n > 1) for _ in range(n)]


async def benchmark(a: argparse.Namespace, reqs: list[Request]) -> tuple[list[Result], float]:
    """(results in request order, seconds from the run's start to the last completion)."""
    chs = open_channels(a.coordinator, client_credentials(a), connections(a, a.max_concurrency or len(reqs)))
    stubs = [api_pb2_grpc.GenerationStub(ch) for ch in chs]
    sent = itertools.count()
    try:
        return await run_schedule(a, reqs, lambda req, t0: run_one(stubs[next(sent) % len(stubs)], req, a, t0))
    finally:
        for ch in chs:
            await ch.close()


Send = Callable[[Request, float], Awaitable[Result]]  # one request's stream, given the run's start (t0)


async def run_schedule(a: argparse.Namespace, reqs: list[Request], send: Send) -> tuple[list[Result], float]:
    """What every backend runs: --num-warmups, then reqs sent on the absolute schedule
    (arrival_times) under --max-concurrency, each measured by send; (results in request
    order, seconds from the run's start to the last completion)."""
    limit = asyncio.Semaphore(a.max_concurrency or len(reqs) or 1)
    await warm_up(send, reqs, a, limit)
    times = arrival_times(len(reqs), a.request_rate, a.burstiness, a.seed)
    progress = Progress(len(reqs), a.disable_tqdm)

    async def limited(req: Request, arrived: float) -> Result:
        async with limit:
            r = await send(req, start)
        r.arrival_time = arrived
        progress.update()
        return r
    start = time.perf_counter()
    tasks = []
    for req, at in zip(reqs, times):  # absolute: a late send does not push the later ones back
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(req, time.perf_counter() - start)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return list(results), duration


async def warm_up(send: Send, reqs: list[Request], a: argparse.Namespace, limit: asyncio.Semaphore) -> None:
    """--num-warmups copies of the first request, all at once (under --max-concurrency),
    before the measured run (vLLM's warm-up); one that fails stops the benchmark."""
    n = getattr(a, "num_warmups", 0)
    if not n or not reqs:
        return

    async def one() -> Result:
        async with limit:
            return await send(reqs[0], 0.0)
    for r in await asyncio.gather(*(one() for _ in range(n))):
        if not r.success:
            raise SystemExit(f"warm-up request failed: {r.error}")


class Progress:
    def __init__(self, total: int, disable: bool):
        self.bar = None
        if not disable:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="requests")
            except ImportError:
                pass

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
