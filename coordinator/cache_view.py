"""The coordinator's view of one node's prefix cache, kept from its heartbeats'
CacheDelta (node.proto): the 64-bit cuts of the block hashes it holds. Only routing
reads it, so a stale view (a lost delta, an eviction not yet reported) costs a cache
miss, never a wrong answer: the node itself matches whole hashes."""
from __future__ import annotations

from pdserve.v1 import node_pb2


class CacheView:
    def __init__(self):
        self.blocks: set[int] = set()
        self.seq = 0              # the last delta applied
        self.version = 0          # grows whenever blocks change (the supervisor's table says so)
        self.want_full = False    # a delta was lost: ask the node for a full list

    def apply(self, delta: node_pb2.CacheDelta) -> None:
        if not delta.seq:
            return  # the node reports no cache
        if delta.full:
            self.blocks = set(delta.added)
            self.want_full = False
        elif delta.seq != self.seq + 1 or self.want_full:
            self.want_full = True  # keep the stale view until the full list comes
            self.seq = delta.seq
            return
        elif delta.added or delta.removed:
            self.blocks.difference_update(delta.removed)
            self.blocks.update(delta.added)
        else:
            self.seq = delta.seq
            return
        self.seq = delta.seq
        self.version += 1

    def replace(self, version: int, blocks) -> None:
        """A worker: the supervisor's view of this node (sent when its version changed)."""
        if version != self.version:
            self.blocks, self.version = set(blocks), version

    def matched(self, hashes: list[int]) -> int:
        """How many leading blocks of a prompt (their 64-bit hashes) this node holds."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n
