"""`pdserve bench --num-clients K`: the streams and the arrival schedule spread over K
client processes, so the client is never what caps a run.

The parent samples the requests and their send times once, as one client would;
request i goes to client i % K with its send time as an offset from a start instant
all clients share, and --max-concurrency is split between them. Clients are spawned
processes that send back JSON lines over a pipe (a progress tick per request, then one
record per request); the parent puts the records back in request order, so the summary
is built exactly as for one client."""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import time
from dataclasses import asdict
from multiprocessing.connection import Connection, wait

from pdserve.bench_result import Request, Result
from pdserve.bench_stream import (Progress, arrival_times, client_credentials, client_tls, connections, open_channels,
                                  run_one, warm_up)

START_DELAY_S = 0.2     # after every client is connected: time for the start message to reach them all
CONNECT_TIMEOUT_S = 30.0


def split(total: int, k: int) -> list[int]:
    """total as k near-equal parts (larger first) that sum to it."""
    return [total // k + (1 if j < total % k else 0) for j in range(k)]


def run_clients(a: argparse.Namespace, reqs: list[Request]) -> tuple[list[Result], float]:
    """(results in request order, seconds from the shared start to the last completion)."""
    k = max(1, min(a.num_clients, len(reqs), a.max_concurrency or len(reqs)))  # every client >= 1 stream
    offsets = arrival_times(len(reqs), a.request_rate, a.burstiness, a.seed)
    if getattr(a, "num_warmups", 0):
        asyncio.run(_warm_up(a, reqs))
    limits = split(a.max_concurrency or len(reqs), k)  # sums to --max-concurrency
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for j in range(k):
        mine = range(j, len(reqs), k)
        job = dict(coordinator=a.coordinator, request_timeout=a.request_timeout, ignore_eos=a.ignore_eos,
                   temperature=a.temperature, model=getattr(a, "model", None), tls=client_tls(a), limit=limits[j],
                   connections=connections(a, limits[j]),
                   requests=[[i, reqs[i].prompt, reqs[i].output_len, offsets[i]] for i in mine])
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=client_main, args=(json.dumps(job), theirs), name=f"bench-client-{j}", daemon=True)
        p.start()
        theirs.close()
        procs.append(p)
        conns.append(ours)
    try:
        for c in conns:  # every client connected before any request goes
            if not c.poll(CONNECT_TIMEOUT_S + 30) or not json.loads(c.recv_bytes()).get("ready"):
                raise RuntimeError("a bench client did not start")
        start = time.time() + START_DELAY_S
        for c in conns:
            c.send_bytes(json.dumps({"start": start}).encode())
        results, end = _collect(conns, len(reqs), a.disable_tqdm)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    lost = Result(error="its bench client process died")
    return [r if r is not None else lost for r in results], max(end - start, 1e-9)


async def _warm_up(a: argparse.Namespace, reqs: list[Request]) -> None:
    from pdserve.wire.rpc import channel
    from pdserve.v1 import api_pb2_grpc
    ch = channel(a.coordinator, client_credentials(a))
    stub = api_pb2_grpc.GenerationStub(ch)
    await warm_up(lambda req, t0: run_one(stub, req, a, t0), reqs, a,
                  asyncio.Semaphore(a.max_concurrency or len(reqs) or 1))
    await ch.close()


def _collect(conns: list[Connection], n: int, quiet: bool) -> tuple[list[Result | None], float]:
    results: list[Result | None] = [None] * n
    progress = Progress(n, quiet)
    end, open_ = 0.0, set(conns)
    while open_:
        for c in wait(list(open_)):
            try:
                msg = json.loads(c.recv_bytes())
            except (EOFError, OSError):  # the client died: its requests without a record fail
                open_.discard(c)
                continue
            if "tick" in msg:
                progress.update()
            elif "record" in msg:
                results[msg["i"]] = Result(**msg["record"])
            elif "end" in msg:
                end = max(end, msg["end"])
                open_.discard(c)
    progress.close()
    return results, end


def client_main(job_json: str, conn: Connection) -> None:
    """A client process: connect, say ready, wait for the start, run its requests on
    their schedule, send the records."""
    job = json.loads(job_json)
    try:
        asyncio.run(_client(job, conn))
    finally:
        conn.close()


async def _client(job: dict, conn: Connection) -> None:
    from pdserve.common.config import ClientConfig
    from pdserve.wire.security import Credentials
    from pdserve.v1 import api_pb2_grpc
    chs = open_channels(job["coordinator"], Credentials.client(ClientConfig(**job["tls"])), job["connections"])
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in chs)), CONNECT_TIMEOUT_S)
    stubs = [api_pb2_grpc.GenerationStub(ch) for ch in chs]
    sent = itertools.count()  # streams round-robin over the connections as they start
    conn.send_bytes(b'{"ready": true}')
    start = json.loads(await asyncio.to_thread(conn.recv_bytes))["start"]
    base = time.perf_counter() + (start - time.time())  # the shared start on this process's clock
    a = argparse.Namespace(ignore_eos=job["ignore_eos"], request_timeout=job["request_timeout"],
                           temperature=job["temperature"], model=job["model"])
    limit = asyncio.Semaphore(job["limit"])
    records: list[tuple[int, Result]] = []

    async def one(i: int, prompt, output_len: int, offset: float) -> None:
        delay = base + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        arrived = time.perf_counter() - base
        async with limit:
            r = await run_one(stubs[next(sent) % len(stubs)], Request(prompt, 0, output_len), a, base)
        r.arrival_time = arrived
        records.append((i, r))
        conn.send_bytes(b'{"tick": 1}')
    await asyncio.gather(*(one(*r) for r in job["requests"]))
    end = time.time()
    for ch in chs:
        await ch.close()
    for i, r in records:
        conn.send_bytes(json.dumps({"i": i, "record": asdict(r)}).encode())
    conn.send_bytes(json.dumps({"end": end}).encode())
