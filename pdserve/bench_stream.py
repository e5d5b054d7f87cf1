"""One benchmark client: the requests' streams on one event loop, each measured into a
Result (pdserve bench runs one of these, or several in processes: bench_clients)."""
from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from pdserve.wire.rpc import channel
from pdserve.v1 import api_pb2, api_pb2_grpc


@dataclass
class Request:
    prompt: list[int] | str
    input_len: int
    output_len: int


@dataclass
class Result:
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    text: str = ""
    phases: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: int = 0


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gamma inter-arrival times (Poisson when burstiness = 1); rate inf sends all at once."""
    if rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return list(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n))


async def run_one(stub, req: Request, a: argparse.Namespace) -> Result:
    sampling = api_pb2.SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=a.ignore_eos)
    msg = api_pb2.GenerateRequest(sampling=sampling)
    if isinstance(req.prompt, str):
        msg.text = req.prompt.encode()
    else:
        msg.token_ids.ids.extend(req.prompt)
    res = Result()
    start = last = time.perf_counter()
    text = []
    try:
        async for resp in stub.Generate(msg, timeout=a.request_timeout):
            now = time.perf_counter()
            if resp.token_ids:
                if resp.index != res.output_tokens:
                    raise IndexError(f"token index {resp.index} after {res.output_tokens} tokens")
                res.token_ids.extend(resp.token_ids)
                if res.output_tokens == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                    res.itl.extend([0.0] * (len(resp.token_ids) - 1))
                res.output_tokens += len(resp.token_ids)
                last = now
            text.append(resp.text)
            if resp.finish_reason:
                res.finish_reason = resp.finish_reason
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


async def benchmark(a: argparse.Namespace, reqs: list[Request]) -> tuple[list[Result], float]:
    ch = channel(a.coordinator, client_credentials(a))
    stub = api_pb2_grpc.GenerationStub(ch)
    limit = asyncio.Semaphore(a.max_concurrency or len(reqs) or 1)
    gaps = arrival_gaps(len(reqs), a.request_rate, a.burstiness, a.seed)
    progress = Progress(len(reqs), a.disable_tqdm)

    async def limited(req: Request) -> Result:
        async with limit:
            r = await run_one(stub, req, a)
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
    await ch.close()
    return results, duration


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
