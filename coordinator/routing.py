"""Which node a request goes to (--routing).

    least-loaded  the registry's order: decode by requests then free blocks, prefill by
                  requests then queued prompt tokens
    round-robin   the candidates in turn
    cache-aware   (default) prefill: the least work before this prompt's first token, in
                  tokens: the prompt's part the node has not cached plus the prompt tokens
                  queued or sent there. Decode and colocated nodes (whose load is their
                  running batch): the longest cached prefix, unless the loads are out of
                  balance (SGLang's router rule: the busiest runs more than BALANCE_ABS
                  requests and BALANCE_REL times the idlest's), then the least loaded

A node's cached blocks are the coordinator's view from its heartbeats (cache_view.py),
matched against the prompt's block hashes from the node's own hash root. The view may
be stale: then the node computes what it lacks, a miss, never a wrong answer."""
from __future__ import annotations

import itertools

from pdserve.common.block_hash import block_hashes, short
from pdserve.v1 import api_pb2


BALANCE_ABS = 4
BALANCE_REL = 1.5


class Router:
    def __init__(self, policy: str):
        self.policy = policy
        self._turn = itertools.count()
        self.routed = 0       # prefill decisions made by cache
        self.cache_hits = 0   # of those, to a node believed to hold part of the prompt

    def order(self, nodes: list, record, role: int) -> list:
        """nodes (the registry's candidates, least loaded first) in the order to try them."""
        if len(nodes) < 2 or self.policy == "least-loaded":
            return nodes
        if self.policy == "round-robin":
            nodes = sorted(nodes, key=lambda n: n.id)
            k = next(self._turn) % len(nodes)
            return nodes[k:] + nodes[:k]
        n = len(record.run_prompt)
        matched = {node.id: self.matched_tokens(node, record) for node in nodes}
        if role == api_pb2.ROLE_DECODE:
            load = {node.id: node.inflight + node.running for node in nodes}
            low, high = min(load.values()), max(load.values())
            if high - low > BALANCE_ABS and high > BALANCE_REL * low:
                return nodes  # out of balance: least loaded first
            return sorted(nodes, key=lambda node: (-matched[node.id], load[node.id]))
        best = sorted(nodes, key=lambda node: n - matched[node.id] + node.queued_tokens + node.inflight_tokens)
        self.routed += 1
        self.cache_hits += matched[best[0].id] > 0
        return best

    def matched_tokens(self, node, record) -> int:
        """Leading prompt tokens the coordinator believes `node` holds (capped so that one is computed)."""
        root = node.model.cache_root
        if not root or not node.cache.blocks:
            return 0
        bs = node.model.block_size
        return min(node.cache.matched(self.hashes(record, root, bs)) * bs, len(record.run_prompt) - 1)

    @staticmethod
    def hashes(record, root: bytes, block_size: int) -> list[int]:
        """The 64-bit block hashes of the request's prompt from this root (kept on the record)."""
        key = (root, block_size, len(record.run_prompt))
        cached = record.block_hashes
        if cached is None or cached[0] != key:
            full = block_hashes(record.run_prompt, block_size, int.from_bytes(root, "little"))
            cached = record.block_hashes = (key, [short(h) for h in full])
        return cached[1]
