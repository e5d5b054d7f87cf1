"""Cache-aware routing: the coordinator's view of each node's prefix cache, kept from
heartbeat deltas, and the policies that order candidate nodes by it."""
from __future__ import annotations

import random

from pdserve.common.block_hash import block_hashes, root_hash, short
from pdserve.coordinator.cache_view import CacheView
from pdserve.coordinator.registry import NodeEntry
from pdserve.coordinator.request import RequestRecord
from pdserve.coordinator.routing import Router
from pdserve.v1 import api_pb2, node_pb2

ROOT = root_hash("m")
BS = 4


def entry(name: str, held: list[int] = (), queued_tokens: int = 0, role=api_pb2.ROLE_PREFILL) -> NodeEntry:
    model = node_pb2.ModelInfo(block_size=BS, cache_root=ROOT.to_bytes(16, "little"))
    node = NodeEntry(id=name, role=role, address=name, kv_endpoint="", tp=1, model=model, epoch=1,
                     kv_blocks_total=64, queued_tokens=queued_tokens)
    node.cache.apply(node_pb2.CacheDelta(seq=1, full=True, added=[short(h) for h in held]))
    return node


def record(prompt: list[int]) -> RequestRecord:
    return RequestRecord("r", prompt, api_pb2.SamplingParams(max_tokens=4), "")


def test_deltas_apply_in_order_and_a_gap_asks_for_a_full_list():
    view = CacheView()
    view.apply(node_pb2.CacheDelta(seq=5, full=True, added=[1, 2, 3]))
    view.apply(node_pb2.CacheDelta(seq=6, added=[4], removed=[1]))
    assert view.blocks == {2, 3, 4} and not view.want_full
    version = view.version
    view.apply(node_pb2.CacheDelta(seq=8, added=[9]))              # seq 7 was lost
    assert view.want_full and view.blocks == {2, 3, 4} and view.version == version
    view.apply(node_pb2.CacheDelta(seq=9, added=[10]))             # still waiting for the full list
    assert view.want_full and 10 not in view.blocks
    view.apply(node_pb2.CacheDelta(seq=10, full=True, added=[9, 10]))
    assert view.blocks == {9, 10} and not view.want_full and view.version > version
    assert view.matched([9, 10, 11]) == 2 and view.matched([11, 9]) == 0


def test_a_worker_gets_what_changed_since_its_version_or_everything():
    view = CacheView()
    view.apply(node_pb2.CacheDelta(seq=1, full=True, added=[1, 2]))
    view.apply(node_pb2.CacheDelta(seq=2, added=[3]))
    view.apply(node_pb2.CacheDelta(seq=3, added=[4], removed=[3, 1]))
    assert view.since(0) == (True, {2, 4}, set())                  # from nothing: a full list
    assert view.since(1) == (False, {4}, {1, 3})
    assert view.since(3) == (False, set(), set())
    mirror = CacheView()
    mirror.patch(1, True, [1, 2], ())
    mirror.patch(3, *view.since(1))
    assert mirror.blocks == view.blocks and mirror.version == view.version


def test_cache_aware_sends_a_prompt_to_the_node_holding_its_longest_prefix():
    rng = random.Random(1)
    prefix = [rng.randrange(100) for _ in range(24)]
    prompt = prefix + [1, 2, 3]
    held = block_hashes(prefix, BS, ROOT)
    a, b, c = entry("a"), entry("b", held[:2]), entry("c", held)
    router = Router("cache-aware")
    assert [n.id for n in router.order([a, b, c], record(prompt), api_pb2.ROLE_PREFILL)] == ["c", "b", "a"]
    assert router.matched_tokens(c, record(prompt)) == 24
    assert router.matched_tokens(c, record(prefix)) == 23          # a whole-prompt hit still computes one token


def test_cache_aware_weighs_the_hit_against_queued_work():
    prefix = list(range(1, 25))
    held = block_hashes(prefix, BS, ROOT)
    busy, idle = entry("busy", held, queued_tokens=500), entry("idle")
    order = Router("cache-aware").order([busy, idle], record(prefix + [7]), api_pb2.ROLE_PREFILL)
    assert [n.id for n in order] == ["idle", "busy"]               # 25 tokens to compute beat 1 + 500 queued
    busy.queued_tokens = 10
    order = Router("cache-aware").order([busy, idle], record(prefix + [7]), api_pb2.ROLE_PREFILL)
    assert [n.id for n in order] == ["busy", "idle"]


def test_a_hash_from_another_root_never_matches():
    prefix = list(range(1, 25))
    other = entry("other", block_hashes(prefix, BS, root_hash("another model")))
    assert Router("cache-aware").matched_tokens(other, record(prefix + [7])) == 0


def test_decode_prefers_the_cache_until_the_loads_are_out_of_balance():
    prefix = list(range(1, 25))
    held = block_hashes(prefix, BS, ROOT)
    warm, cold = entry("warm", held, role=api_pb2.ROLE_DECODE), entry("cold", role=api_pb2.ROLE_DECODE)
    router = Router("cache-aware")
    assert router.order([cold, warm], record(prefix + [7]), api_pb2.ROLE_DECODE)[0] is warm
    warm.running = 4
    assert router.order([cold, warm], record(prefix + [7]), api_pb2.ROLE_DECODE)[0] is warm
    warm.running = 5                                               # 5 - 0 > 4 and 5 > 1.5 * 0
    assert router.order([cold, warm], record(prefix + [7]), api_pb2.ROLE_DECODE)[0] is cold


def test_round_robin_takes_turns_and_least_loaded_keeps_the_registry_order():
    nodes = [entry(x) for x in "abc"]
    rr = Router("round-robin")
    firsts = [rr.order(nodes, record([1, 2]), api_pb2.ROLE_PREFILL)[0].id for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    held = entry("z", block_hashes(list(range(1, 25)), BS, ROOT))
    assert Router("least-loaded").order([nodes[0], held], record(list(range(1, 26))), api_pb2.ROLE_PREFILL)[0].id == "a"
