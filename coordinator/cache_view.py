"""The coordinator's view of one node's prefix cache, kept from its heartbeats'
CacheDelta (node.proto): the 64-bit cuts of the block hashes it holds. Only routing
reads it, so a stale view (a lost delta, an eviction not yet reported) costs a cache
miss, never a wrong answer: the node itself matches whole hashes.

Each change makes a new version; the last few changes are kept so the supervisor can
send each worker only what changed since the version that worker has."""
from __future__ import annotations

from collections import deque

from pdserve.v1 import node_pb2

HISTORY = 32  # versions of changes kept for workers that lag


class CacheView:
    def __init__(self):
        self.blocks: set[int] = set()
        self.seq = 0              # the last delta applied
        self.version = 0          # grows whenever blocks change
        self.want_full = False    # a delta was lost: ask the node for a full list
        self._changes: deque[tuple[int, bool, list[int], list[int]]] = deque(maxlen=HISTORY)

    def apply(self, delta: node_pb2.CacheDelta) -> None:
        if not delta.seq:
            return  # the node reports no cache
        gap = delta.seq != self.seq + 1
        self.seq = delta.seq
        if delta.full:
            self.want_full = False
            self.patch(self.version + 1, True, delta.added, ())
        elif gap or self.want_full:
            self.want_full = True  # keep the stale view until the full list comes
        elif delta.added or delta.removed:
            self.patch(self.version + 1, False, delta.added, delta.removed)

    def patch(self, version: int, full: bool, added, removed) -> None:
        """Apply a change that makes `version` (a worker: as its supervisor sent it)."""
        if full:
            self.blocks = set(added)
        else:
            self.blocks.difference_update(removed)
            self.blocks.update(added)
        self.version = version
        self._changes.append((version, full, [] if full else list(added), list(removed)))  # full: see blocks

    def since(self, version: int) -> tuple[bool, set[int], set[int]]:
        """What changed after `version`: (full, added, removed); full: added is every block."""
        changes = [c for c in self._changes if c[0] > version]
        if version == self.version:
            return False, set(), set()
        if not changes or changes[0][0] != version + 1 or any(c[1] for c in changes):
            return True, self.blocks, set()
        added: set[int] = set()
        removed: set[int] = set()
        for _, _, a, r in changes:
            added.difference_update(r)
            removed.update(r)
            added.update(a)
            removed.difference_update(a)
        return False, added, removed

    def matched(self, hashes: list[int]) -> int:
        """How many leading blocks of a prompt (their 64-bit hashes) this node holds."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n
