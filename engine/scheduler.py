"""Continuous batching: every step decides which sequences run and how many of
their tokens, under a token budget and the free KV blocks.

A step computes, for each scheduled sequence, tokens [num_computed, num_computed + n).
A sequence whose every known token is then computed samples its next token. Running
sequences go first (decodes and unfinished prompt chunks), then waiting ones are
admitted while budget, batch slots and blocks last. When blocks run out, the newest
running sequence is preempted: its blocks are freed and it is recomputed later.

With prefix caching (engine/block_manager.py), an admitted sequence first links the
cached blocks of its longest cached prefix and starts computing after them, as a
chunked prefill continues after its earlier chunks; every block a step completes is
registered in the cache."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether seqs[i] produces a token this step (all its known tokens computed)."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its blocks (e.g. received from a prefill
        node). Its blocks were reserved by the caller, so max_num_seqs is the caller's to
        enforce when it reserves."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.budget
        kept: list[Sequence] = []
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.ensure(seq.block_table, seq.num_computed_tokens + n):
                victim = queue.pop() if queue else seq
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                kept.append(seq)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
        self.running = kept + queue
        if batch.preempted:
            return batch  # no admissions in a step that had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.blocks.lookup(seq)
            cached = len(hit) * self.blocks.block_size
            n = seq.num_tokens - cached
            if n > budget:
                if not self.chunked_prefill:
                    break
                n = budget
            self.blocks.acquire(hit)
            seq.block_table = list(hit)
            if not self.blocks.ensure(seq.block_table, cached + n):
                self.blocks.free(hit)
                seq.block_table = []
                break
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            seq.num_registered_blocks = len(hit)
            self.blocks.count_hit(seq.num_tokens, cached)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def advance(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens are now in the cache."""
        bs = self.blocks.block_size if self.blocks.caching else 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if bs and seq.num_computed_tokens // bs > seq.num_registered_blocks:  # a block was completed
                self.blocks.cache_full(seq)

    def finish(self, seq: Sequence, reason: str, keep_blocks: bool = False) -> None:
        """End a sequence (stopped, length, aborted) and release its blocks, unless
        keep_blocks: then the caller owns them and must release() them."""
        if seq.status == SeqStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_blocks:
            self.release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
