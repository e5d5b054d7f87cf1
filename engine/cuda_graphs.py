"""CUDA graphs for decode steps, one per batch-size bucket (nano-vllm style).

A decode-only step of n sequences replays the smallest captured bucket >= n. The
rows past n are padding: slot -1 (their K/V are written nowhere) and context 0
(attention reads nothing). Prefill and mixed steps replay the prefill graphs
(engine/prefill_graphs.py), or run eagerly. With TP, every
rank captures the same buckets in the same order, so the NCCL collectives inside
the graphs line up.

A replay moves its inputs in one host-to-device copy: the step is packed into pinned
memory as [n, m, ids, positions, slots, context, tables[n, m], sample_tokens], and a
kernel captured at the head of each graph spreads it over the graph's static inputs
and pads the rows past n."""
from __future__ import annotations

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.step_inputs import Staging
from pdserve.engine.triton_ops import unpack_decode_inputs


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
        self.packed = torch.zeros(2 + 5 * self.max_batch + self.max_batch * max_blocks, dtype=torch.long, device=dev)
        self.staging = Staging(torch.long)
        self.arange = np.arange(self.max_batch)
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

    def _unpack(self, b: int) -> None:
        unpack_decode_inputs(self.packed, self.ids[:b], self.positions[:b], self.slots[:b], self.context[:b],
                             self.tables[:b])

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """pool: a memory pool to share (the prefill graphs')."""
        model = self.runner.model
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(b)
            for _ in range(2):  # warm up (Triton compiles, allocator settles); packed n = 0: all padding
                self._unpack(b)
                model.compute_logits(model(self.ids[:b], self.positions[:b], meta))
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._unpack(b)
                hidden = model(self.ids[:b], self.positions[:b], meta)
                # with TP the LM head's gather (point-to-point) runs eagerly after the replay
                self.logits[b] = model.compute_logits(hidden) if self.runner.cfg.tp == 1 else hidden
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)

    def replay(self, plan) -> torch.Tensor | None:
        n = plan.query_lens.numel()
        b = next(x for x in self.buckets if x >= n)
        m = plan.block_tables.shape[1]
        sample = plan.sample_tokens.numpy()
        every_row = sample.size == n and np.array_equal(sample, self.arange[:n])  # the usual decode step
        size = 2 + 4 * n + n * m + (0 if every_row else sample.size)
        i, staged, host = self.staging.take(size)  # pinned memory, filled through numpy
        host[0], host[1] = n, m
        o = 2
        for part in (plan.input_ids, plan.positions, plan.slot_mapping, plan.context_lens):
            host[o:o + n] = part.numpy()
            o += n
        host[o:o + n * m] = plan.block_tables.numpy().reshape(-1)
        o += n * m
        if not every_row:
            host[o:size] = sample
        self.packed[:size].copy_(staged[:size], non_blocking=True)
        self.staging.copied(i, self.packed.device)
        self.graphs[b].replay()
        out = self.logits[b][:n] if every_row else self.logits[b][self.packed[o:size]]
        return out if self.runner.cfg.tp == 1 else self.runner.model.compute_logits(out)
