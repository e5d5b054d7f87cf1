"""Fixed-size KV blocks with reference counts, and the automatic prefix cache.

Allocation either succeeds whole or changes nothing, so a caller can always back off
cleanly. With a hash root (prefix caching on), every full block a sequence has
computed is registered under its chained hash (pdserve.common.block_hash); a later
sequence whose leading blocks hash the same links those blocks instead of computing
them (shared, reference-counted). A registered block is never written again. Blocks
with no reference stay in the free list in LRU order: unregistered ones are reused
first, registered ones are evicted, least recently freed first, only when the pool
needs them."""
from __future__ import annotations

from collections import OrderedDict

from pdserve.common.block_hash import chain


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, hash_root: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: taken first
        self.root = hash_root
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}     # hash -> block holding that prefix's KV
        self.query_tokens = 0                # prompt tokens looked up / found cached (hit rate)
        self.hit_tokens = 0
        self.evictions = 0
        self.listener = None                 # called (stored, hashes) on each store and eviction

    @property
    def caching(self) -> bool:
        return self.root is not None

    @property
    def num_free(self) -> int:
        """Blocks with no reference, cached ones included (they are evicted on demand)."""
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref count 1; raises MemoryError (and takes nothing) if short."""
        if n > len(self.free_ids):
            raise MemoryError(f"need {n} KV blocks, {len(self.free_ids)} free")
        ids = [self.free_ids.popitem(last=False)[0] for _ in range(n)]
        evicted = []
        for i in ids:
            self.ref_counts[i] = 1
            h = self.block_hash[i]
            if h is not None:
                self.block_hash[i] = None
                del self.cached[h]
                evicted.append(h)
        if evicted:
            self.evictions += len(evicted)
            if self.listener is not None:
                self.listener(False, evicted)
        return ids

    def share(self, ids: list[int]) -> None:
        """Take another reference (e.g. a transfer still reading blocks a request released)."""
        for i in ids:
            if self.ref_counts[i] <= 0:
                raise ValueError(f"block {i} is not allocated")
            self.ref_counts[i] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference per block; a block with no references returns to the pool:
        a cached one as the most recently used (a table's later blocks evicted before its
        earlier ones, which they depend on), an uncached one to be reused first."""
        for i in reversed(ids):
            if self.ref_counts[i] <= 0:
                raise ValueError(f"block {i} freed twice")
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self.free_ids[i] = None
                if self.block_hash[i] is None:
                    self.free_ids.move_to_end(i, last=False)

    def ensure(self, table: list[int], num_tokens: int) -> bool:
        """Grow `table` in place to hold num_tokens; False (table unchanged) if blocks are short."""
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        table.extend(self.allocate(need))
        return True

    # prefix cache

    def hashes(self, seq, num_blocks: int) -> list[int]:
        """seq.block_hashes grown to its first num_blocks full blocks (tokens never change)."""
        hs, bs = seq.block_hashes, self.block_size
        num_blocks = min(num_blocks, seq.num_tokens // bs)
        parent = hs[-1] if hs else self.root
        for b in range(len(hs), num_blocks):
            parent = chain(parent, seq.token_ids(b * bs, (b + 1) * bs))
            hs.append(parent)
        return hs

    def lookup(self, seq, num_tokens: int | None = None) -> list[int]:
        """The cached blocks holding seq's leading full blocks among its first num_tokens
        tokens (default: all but the last, which must be computed to sample); takes no
        reference. [] when caching is off."""
        if self.root is None:
            return []
        limit = (seq.num_tokens - 1 if num_tokens is None else num_tokens) // self.block_size
        hit = []
        for h in self.hashes(seq, limit)[:limit]:
            blk = self.cached.get(h)
            if blk is None:
                break
            hit.append(blk)
        return hit

    def acquire(self, ids: list[int]) -> None:
        """Take a reference on cached blocks, those in the free list included."""
        for i in ids:
            if self.ref_counts[i] == 0:
                if self.block_hash[i] is None:
                    raise ValueError(f"block {i} is neither allocated nor cached")
                del self.free_ids[i]
            self.ref_counts[i] += 1

    def count_hit(self, query_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def cache_full(self, seq) -> None:
        """Register seq's full blocks whose every token is computed; from then on they
        are read-only. A block whose hash another block already holds stays unregistered."""
        if self.root is None:
            return
        done = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if done <= seq.num_registered_blocks:
            return
        hs = self.hashes(seq, done)
        stored = []
        for b in range(seq.num_registered_blocks, done):
            h, blk = hs[b], seq.block_table[b]
            if h not in self.cached and self.block_hash[blk] is None:
                self.cached[h] = blk
                self.block_hash[blk] = h
                stored.append(h)
        seq.num_registered_blocks = done
        if stored and self.listener is not None:
            self.listener(True, stored)

    def is_cached(self, block: int) -> bool:
        return self.block_hash[block] is not None
