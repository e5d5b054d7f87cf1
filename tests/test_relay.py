"""The relay path and the bench client against synthetic nodes (no model): every
stream of many concurrent ones gets exactly its tokens, in order, with the right
finish, and `pdserve bench` spread over client processes keeps up with a node that
emits as fast as asked."""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys

import grpc
import pytest

from pdserve.bench import sample_requests
from pdserve.synthetic_cluster import SyntheticCluster, coordinator_workers
from pdserve.synthetic_node import synthetic_token
from pdserve.v1 import api_pb2, api_pb2_grpc

# 2 coordinator workers where this tree's coordinator takes --workers; else today's single process
WORKERS = 2 if coordinator_workers() else 1
VOCAB = 32000


@pytest.fixture(scope="module", params=["both", "pair"])
def cluster(request):
    with SyntheticCluster(nodes=1, role=request.param, workers=WORKERS, node_flags=("--step-period", "0.002")) as c:
        yield c


async def drive(address: str, jobs: list[tuple[list[int], int, list[int]]]) -> list[dict]:
    """All jobs (prompt, max_tokens, stop ids) at once; each stream's tokens, finish and status."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = api_pb2_grpc.GenerationStub(ch)

        async def one(prompt, max_tokens, stop):
            req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=stop))
            req.token_ids.ids.extend(prompt)
            tokens, finish, gaps = [], 0, 0
            async for resp in stub.Generate(req, timeout=120):
                gaps += bool(resp.token_ids) and resp.index != len(tokens)
                tokens.extend(resp.token_ids)
                finish = resp.finish_reason or finish
            return {"tokens": tokens, "finish": finish, "gaps": gaps}
        return await asyncio.gather(*(one(*j) for j in jobs))


def test_256_streams_through_the_coordinator_each_get_exactly_their_tokens_and_finish(cluster):
    jobs = []
    for i in range(256):
        prompt = [i + 1, 7 * i % 101, 3]
        max_tokens = 8 + i % 40
        stop = [synthetic_token(prompt, 5, VOCAB)] if i % 8 == 0 else []  # every 8th ends on a stop token
        jobs.append((prompt, max_tokens, stop))
    results = asyncio.run(drive(cluster.address, jobs))
    for (prompt, max_tokens, stop), r in zip(jobs, results):
        n = 6 if stop else max_tokens
        assert r["gaps"] == 0
        assert r["tokens"] == [synthetic_token(prompt, k, VOCAB) for k in range(n)]
        assert r["finish"] == (api_pb2.FINISH_REASON_STOP if stop else api_pb2.FINISH_REASON_LENGTH)


def test_bench_over_two_client_processes_gets_every_token_well_above_a_node_rate(cluster, tmp_path):
    """A CPU node of a tiny model makes a few hundred tokens/s; the bench over two
    processes must relay several times that with every token and finish right."""
    n, out_len = 256, 64
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", "--coordinator", cluster.address,
                        "--num-clients", "2", "--num-prompts", str(n), "--max-concurrency", "128",
                        "--random-input-len", "8", "--random-output-len", str(out_len), "--disable-tqdm",
                        "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
                        "--result-filename", "r.json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path / "r.json").read_text())
    assert s["num_clients"] == 2 and s["completed"] == n and not any(s["errors"])
    reqs = sample_requests(argparse.Namespace(dataset_name="random", seed=0, num_prompts=n, random_input_len=8,
                                              random_output_len=out_len, random_range_ratio=0.0), VOCAB, 4096)
    for q, ids, finish in zip(reqs, s["output_token_ids"], s["finish_reasons"]):
        assert ids == [synthetic_token(q.prompt, k, VOCAB) for k in range(out_len)] and finish == "length"
    assert len(s["ttfts"]) == n and sum(s["output_lens"]) == n * out_len
    assert s["output_throughput"] > 2000  # tokens/s: a generous floor, far above a tiny-model CPU node


def test_a_cancelled_stream_is_aborted_on_the_synthetic_node(cluster):
    import time
    from pdserve.client import status

    def held() -> int:  # requests running or reserved on the nodes, as their last heartbeats say
        return sum(n["running"] + n["queued"] for n in status(cluster.address)["nodes"])

    def wait(until, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, status(cluster.address)["nodes"]
            time.sleep(0.1)
    with grpc.insecure_channel(cluster.address) as ch:
        req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(max_tokens=4000, temperature=0.0,
                                                                      ignore_eos=True))
        req.token_ids.ids.extend([5, 6, 7])
        call = api_pb2_grpc.GenerationStub(ch).Generate(req, timeout=60)
        next(call)
        wait(lambda: held() == 1, 5)
        call.cancel()
    # well before its 4000 tokens (>= 8 s at 2 ms steps) could end by themselves
    wait(lambda: held() == 0, 4)
    assert all(n["kv_blocks_free"] == n["kv_blocks_total"] for n in status(cluster.address)["nodes"])


def test_bench_streams_spread_over_connections_of_their_own():
    """A coordinator's --workers share clients by TCP connection (SO_REUSEPORT): a bench
    client spreads its streams over several connections (one per 32 streams by default),
    each its own, not gRPC's one shared connection per address."""
    from pdserve.bench_stream import connections, open_channels
    from pdserve.wire.security import NONE
    assert [connections(argparse.Namespace(connections_per_client=0), s) for s in (1, 32, 33, 128, 4096)] == \
        [1, 1, 2, 4, 16]
    assert connections(argparse.Namespace(connections_per_client=3), 1) == 3

    async def peers(n: int, shared: bool = False) -> set[str]:
        """The client addresses a server saw from n channels (shared: plain channels)."""
        seen = []

        async def answer(request, context):
            seen.append(context.peer())
            return b""
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.S", {"M": grpc.unary_unary_rpc_method_handler(answer)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        chs = [grpc.aio.insecure_channel(address) for _ in range(n)] if shared else open_channels(address, NONE, n)
        try:
            for ch in chs:
                await ch.unary_unary("/t.S/M")(b"", timeout=10)
        finally:
            for ch in chs:
                await ch.close()
            await server.stop(None)
        return set(seen)
    assert len(asyncio.run(peers(3))) == 3
    assert len(asyncio.run(peers(1))) == 1
    assert len(asyncio.run(peers(3, shared=True))) == 1  # why: plain channels share one connection
