"""What a node tells the coordinator beside its load, heartbeat by heartbeat: its
counters (prefix-cache hits, KV sent) and the prefix-cache blocks it stored and
evicted since the previous heartbeat (node.proto CacheDelta), for cache-aware routing.

The block manager reports stores and evictions on the engine thread; heartbeats are
built on the event loop, so both sides meet under one lock. A full list goes with the
first heartbeat after a registration and whenever the coordinator asks (it lost a delta)."""
from __future__ import annotations

import threading

from pdserve.common.block_hash import short
from pdserve.v1 import api_pb2, node_pb2


class NodeReport:
    def __init__(self, engine):
        self.engine = engine
        spec = engine.spec
        itemsize = engine.executor.runner.dtype.itemsize
        # one block's KV over every layer and KV head: what a transport moves per block
        self.block_bytes = 2 * engine.cfg.block_size * spec.num_kv_heads * spec.head_dim * itemsize * spec.num_layers
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._added: set[int] = set()
        self._removed: set[int] = set()
        self._seq = 0
        self._full = True
        self.kv_transfers = self.kv_blocks = self.kv_bytes = 0
        self.local_prefills = 0
        engine.blocks.listener = self._on_blocks

    def _on_blocks(self, stored: bool, hashes: list[int]) -> None:
        """(engine thread) Blocks registered in the cache (stored) or evicted from it."""
        with self._lock:
            for h in hashes:
                s = short(h)
                if stored:
                    self._held.add(s)
                    self._added.add(s)
                    self._removed.discard(s)
                else:
                    self._held.discard(s)
                    self._removed.add(s)
                    self._added.discard(s)

    def want_full(self) -> None:
        """The next heartbeat lists every cached block (a new registration, a lost delta)."""
        with self._lock:
            self._full = True

    def sent(self, num_blocks: int, num_bytes: int | None) -> None:
        """A KV transfer of num_blocks blocks was acknowledged (num_bytes: its own count, if it keeps one)."""
        self.kv_transfers += 1
        self.kv_blocks += num_blocks
        self.kv_bytes += num_bytes if num_bytes is not None else num_blocks * self.block_bytes

    def counters(self) -> api_pb2.NodeCounters:
        b = self.engine.blocks
        return api_pb2.NodeCounters(prefix_query_tokens=b.query_tokens, prefix_hit_tokens=b.hit_tokens,
                                    prefix_evicted_blocks=b.evictions, kv_transfers_sent=self.kv_transfers,
                                    kv_blocks_sent=self.kv_blocks, kv_bytes_sent=self.kv_bytes,
                                    local_prefills=self.local_prefills)

    def delta(self) -> node_pb2.CacheDelta:
        """The cache changes since the previous call (everything held, where a full list is due)."""
        with self._lock:
            self._seq += 1
            if self._full:
                out = node_pb2.CacheDelta(seq=self._seq, full=True, added=self._held)
            else:
                out = node_pb2.CacheDelta(seq=self._seq, added=self._added, removed=self._removed)
            self._full = False
            self._added, self._removed = set(), set()
        return out
