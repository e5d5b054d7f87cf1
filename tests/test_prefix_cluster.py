"""Prefix caching through a real cluster: the decode node links the prompt blocks it
holds already, the prefill node sends only the rest (the transfer's own counters say
so), and the tokens stay those of transformers."""
from __future__ import annotations

import random
import time

import pytest

from tests.cluster_util import Client, start_cluster
from tests.conftest import assert_matches_reference


def node(client: Client, role: str) -> dict:
    [n] = [n for n in client.status()["nodes"] if n["role"] == role]
    return n


def counters_when(client: Client, role: str, ready, timeout: float = 15.0) -> dict:
    """A node's counters once ready(counters) holds (they come with its heartbeats)."""
    deadline = time.monotonic() + timeout
    while True:
        c = node(client, role)["counters"]
        if ready(c):
            return c
        if time.monotonic() > deadline:
            raise AssertionError(f"{role} counters never got there: {c}")
        time.sleep(0.1)


@pytest.mark.parametrize("caching, transport, decode_tp", [(True, "zmq", 1), (False, "zmq", 1), (True, "zmq", 2),
                                                           (True, "cuda-ipc", 1), (True, "nccl", 1)])
def test_a_second_request_with_the_same_prefix_sends_only_the_blocks_decode_lacks(tiny_models, reference, caching,
                                                                                  transport, decode_tp):
    """Every transport moves only the blocks the ticket lists (cuda-ipc over host shared
    memory and nccl over gloo on CPU), into decode ranks that re-slice the heads too."""
    model = tiny_models["qwen3"]
    rng = random.Random(3)
    prefix = [rng.randrange(384) for _ in range(40)]          # 2 full blocks of 16 and 8 tokens
    jobs = [(prefix + [rng.randrange(384) for _ in range(n)], 6) for n in (5, 7)]  # 3 blocks each
    cluster = start_cluster(model=model, kv_blocks=64, kv_transport=transport, decode_tp=decode_tp,
                            node_flags=() if caching else ("--no-prefix-caching",))
    client = Client(cluster.cfg.listen)
    try:
        first = client.generate_all(jobs[:1])[0]
        c1 = counters_when(client, "prefill", lambda c: c["kv_transfers_sent"] == 1)
        second = client.generate_all(jobs[1:])[0]
        c2 = counters_when(client, "prefill", lambda c: c["kv_transfers_sent"] == 2)
        decode = counters_when(client, "decode", lambda c: c["prefix_query_tokens"] >= 92)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    assert c1["kv_blocks_sent"] == 3 and c1["kv_bytes_sent"] > 0
    blocks, nbytes = c2["kv_blocks_sent"] - c1["kv_blocks_sent"], c2["kv_bytes_sent"] - c1["kv_bytes_sent"]
    if caching:
        assert blocks == 1 and nbytes * 3 == c1["kv_bytes_sent"], "only the block decode lacks is sent"
        assert decode["prefix_hit_tokens"] == 32
    else:
        assert blocks == 3 and nbytes == c1["kv_bytes_sent"]
        assert decode["prefix_hit_tokens"] == 0
    ref = reference(model)
    for (prompt, n), out in zip(jobs, (first, second)):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), f"caching={caching}")


def prefill_nodes(client: Client) -> dict[str, dict]:
    return {n["id"]: n for n in client.status()["nodes"] if n["role"] == "prefill"}


def wait_for(what: str, fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("routing, workers", [("cache-aware", 1), ("cache-aware", 2), ("round-robin", 1)])
def test_requests_sharing_a_prefix_go_to_the_prefill_node_holding_it(tiny_models, reference, routing, workers):
    """With --workers 2 the worker serving the client routes from the supervisor's table."""
    model = tiny_models["qwen3"]
    rng = random.Random(8)
    prefix = [rng.randrange(384) for _ in range(40)]
    shared = [(prefix + [rng.randrange(384) for _ in range(5)], 6) for _ in range(5)]
    # 4 blocks, the first the prefix's (so they go to its holder): a 6-block pool evicts the prefix's second
    floods = [(prefix[:16] + [rng.randrange(384) for _ in range(48)], 6) for _ in range(3)]
    again = [(prefix + [rng.randrange(384) for _ in range(5)], 6)]
    cluster = start_cluster(model=model, prefill=2, kv_blocks=6, kv_transport="zmq", workers=workers,
                            coordinator_flags=("--routing", routing))
    client = Client(cluster.cfg.listen)
    outs = []
    try:
        wait_for("two prefill nodes", lambda: len(prefill_nodes(client)) == 2)
        outs += client.generate_all(shared[:1])
        holder = wait_for("the coordinator knows the prefix's blocks",
                          lambda: [i for i, n in prefill_nodes(client).items() if n["cached_blocks"] >= 2])[0]
        for job in shared[1:]:
            outs += client.generate_all([job])
        sent = wait_for("5 transfers counted", lambda: (lambda ns: ns if sum(
            n["counters"]["kv_transfers_sent"] for n in ns.values()) == 5 else None)(prefill_nodes(client)))
        if routing == "cache-aware":
            assert sent[holder]["counters"]["kv_transfers_sent"] == 5, "every shared-prefix request goes to its holder"
            assert sent[holder]["counters"]["prefix_hit_tokens"] == 4 * 32
            # the holder evicts the prefix; whatever the coordinator still believes, the answer is right
            for job in floods:
                outs += client.generate_all([job])
            outs += client.generate_all(again)
            wait_for("the holder took all 9 and evicted blocks", lambda: (lambda c: c["prefix_evicted_blocks"] > 0 and
                     c["kv_transfers_sent"] == 9)(prefill_nodes(client)[holder]["counters"]))
        else:
            assert all(n["counters"]["kv_transfers_sent"] >= 2 for n in sent.values()), "turns: both nodes work"
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    ref = reference(model)
    jobs = shared + (floods + again if routing == "cache-aware" else [])
    for i, ((prompt, n), out) in enumerate(zip(jobs, outs)):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), f"{routing} request {i}")


def test_the_decode_node_prefills_a_prompt_it_mostly_holds_itself(tiny_models, reference):
    model = tiny_models["qwen3"]
    rng = random.Random(4)
    prefix = [rng.randrange(384) for _ in range(48)]          # 3 blocks
    jobs = [(prefix + [rng.randrange(384) for _ in range(n)], 6) for n in (5, 7)]
    cluster = start_cluster(model=model, kv_blocks=64, kv_transport="zmq", node_flags=("--local-prefill-tokens", "16"))
    client = Client(cluster.cfg.listen)
    try:
        first = client.generate_all(jobs[:1])[0]              # 53 tokens not cached on decode: a prefill node's
        second = client.generate_all(jobs[1:])[0]             # 7 tokens not cached: decode prefills them
        decode = counters_when(client, "decode", lambda c: c["local_prefills"] == 1)
        prefill = counters_when(client, "prefill", lambda c: c["kv_transfers_sent"] == 1)
        client.wait_blocks_at_baseline()
    finally:
        client.close()
        cluster.stop()
    assert prefill["prefix_query_tokens"] == 53, "the second request never reached the prefill node"
    assert decode["prefix_hit_tokens"] == 48
    ref = reference(model)
    for (prompt, n), out in zip(jobs, (first, second)):
        assert_matches_reference(out["token_ids"], ref.generate(prompt, n), "local prefill")
