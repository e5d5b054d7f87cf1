"""Helpers for end-to-end tests: a real local cluster and a small client."""
from __future__ import annotations

import time

import grpc

from pdserve.client import status
from pdserve.cluster import Cluster, ClusterConfig, free_port
from pdserve.v1 import api_pb2, api_pb2_grpc
from pdserve.wire.security import NONE, Credentials


def start_cluster(**kwargs) -> Cluster:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("workers", 1)  # one coordinator process whatever the cores, unless a test asks for more
    kwargs.setdefault("listen", f"127.0.0.1:{free_port()}")
    cfg = ClusterConfig(**kwargs)
    cluster = Cluster(cfg)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def greedy(max_tokens: int, **kw) -> api_pb2.SamplingParams:
    return api_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def request(prompt: list[int] | str, sampling: api_pb2.SamplingParams, chat: bool = False) -> api_pb2.GenerateRequest:
    req = api_pb2.GenerateRequest(sampling=sampling)
    if isinstance(prompt, str):
        if chat:
            req.chat.messages.add(role="user", content=prompt)
        else:
            req.text = prompt.encode()
    else:
        req.token_ids.ids.extend(prompt)
    return req


class Client:
    def __init__(self, address: str, own_connection: bool = False, creds: Credentials = NONE):
        """own_connection: a TCP connection of its own (channels in one process share one by
        default), so that a coordinator with --workers may serve it on another worker;
        creds: TLS and API key of a secured cluster."""
        self.address, self.creds = address, creds
        self.channel = creds.sync_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]
                                          if own_connection else None)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def generate(self, req: api_pb2.GenerateRequest, timeout: float = 120.0) -> dict:
        """Run a request to the end; token indexes must have no gaps or duplicates."""
        tokens, text, finish = [], [], 0
        for resp in self.stub.Generate(req, timeout=timeout, metadata=self.creds.metadata()):
            if resp.token_ids:
                assert resp.index == len(tokens), f"index {resp.index} after {len(tokens)} tokens"
            tokens.extend(resp.token_ids)
            text.append(resp.text)
            finish = resp.finish_reason or finish
        return {"token_ids": tokens, "text": "".join(text), "finish_reason": finish}

    def generate_all(self, jobs: list[tuple[list[int], int]]) -> list[dict]:
        """Greedy requests (prompt ids, max tokens) all at once, results in job order."""
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(lambda j: self.generate(request(j[0], greedy(j[1], ignore_eos=True))), jobs))

    def status(self) -> dict:
        return status(self.address, creds=self.creds)

    def wait_blocks_at_baseline(self, timeout: float = 15.0) -> list[dict]:
        """Poll until every healthy node reports all its KV blocks free; return the nodes."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = [n for n in self.status()["nodes"] if n["healthy"]]
            if all(n["kv_blocks_free"] == n["kv_blocks_total"] and n["running"] == 0 for n in nodes):
                return nodes
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks not back at baseline: {nodes}")
            time.sleep(0.2)
