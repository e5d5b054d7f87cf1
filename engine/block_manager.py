"""Fixed-size KV blocks with reference counts. Allocation either succeeds whole or
changes nothing, so a caller can always back off cleanly."""
from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref count 1; raises MemoryError (and takes nothing) if short."""
        if n > len(self.free_ids):
            raise MemoryError(f"need {n} KV blocks, {len(self.free_ids)} free")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """Take another reference (e.g. a transfer still reading blocks a request released)."""
        for i in ids:
            if self.ref_counts[i] <= 0:
                raise ValueError(f"block {i} is not allocated")
            self.ref_counts[i] += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference per block; a block with no references returns to the pool."""
        for i in ids:
            if self.ref_counts[i] <= 0:
                raise ValueError(f"block {i} freed twice")
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self.free_ids.append(i)

    def ensure(self, table: list[int], num_tokens: int) -> bool:
        """Grow `table` in place to hold num_tokens; False (table unchanged) if blocks are short."""
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return True
        if not self.can_allocate(need):
            return False
        table.extend(self.allocate(need))
        return True
