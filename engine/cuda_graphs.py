"""CUDA graphs for decode steps, one per batch-size bucket (nano-vllm style).

A decode-only step of n sequences replays the smallest captured bucket >= n. The
rows past n are padding: slot -1 (their K/V are written nowhere) and context 0
(attention reads nothing). Prefill and mixed steps run eagerly. With TP, every
rank captures the same buckets in the same order, so the NCCL collectives inside
the graphs line up."""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.buckets = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
        if self.buckets[-1] < max_batch:
            self.buckets.append(max_batch)
        self.max_batch = self.buckets[-1]
        dev = runner.device
        max_blocks = -(-runner.max_model_len // runner.cfg.block_size)
        self.ids = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((self.max_batch,), -1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.context = torch.zeros(self.max_batch, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}     # logits (TP 1) or hidden states (TP > 1)

    def fits(self, plan) -> bool:
        n = plan.query_lens.numel()
        return plan.input_ids.numel() == n and n <= self.max_batch \
            and plan.block_tables.shape[1] <= self.tables.shape[1]

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                                 context_lens=self.context[:b], query_lens=[1] * b, context_lens_host=[],
                                 decode_rows=torch.empty(0), decode_tokens=torch.empty(0), prefill_rows=[],
                                 triton=True, max_query_len=1)

    @torch.inference_mode()
    def capture(self) -> None:
        model, pool = self.runner.model, None
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(b)
            for _ in range(2):  # warm up (Triton compiles, allocator settles)
                model.compute_logits(model(self.ids[:b], self.positions[:b], meta))
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = model(self.ids[:b], self.positions[:b], meta)
                # with TP the LM head's gather (point-to-point) runs eagerly after the replay
                self.logits[b] = model.compute_logits(hidden) if self.runner.cfg.tp == 1 else hidden
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)

    def replay(self, plan) -> torch.Tensor | None:
        n = plan.query_lens.numel()
        b = next(x for x in self.buckets if x >= n)
        dev = self.runner.device
        m = plan.block_tables.shape[1]
        self.ids[:n].copy_(plan.input_ids, non_blocking=True)
        self.positions[:n].copy_(plan.positions, non_blocking=True)
        self.slots[:n].copy_(plan.slot_mapping, non_blocking=True)
        self.context[:n].copy_(plan.context_lens, non_blocking=True)
        self.tables[:n, :m].copy_(plan.block_tables, non_blocking=True)
        if b > n:
            self.slots[n:b].fill_(-1)
            self.context[n:b].zero_()
        self.graphs[b].replay()
        out = self.logits[b][plan.sample_tokens.to(dev)]
        return out if self.runner.cfg.tp == 1 else self.runner.model.compute_logits(out)
