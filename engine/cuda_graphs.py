"""CUDA graphs for decode steps, one per batch-size bucket (nano-vllm style).

A decode-only step of n sequences replays the smallest captured bucket >= n. The
rows past n are padding: slot -1 (their K/V are written nowhere) and context 0
(attention reads nothing). Prefill and mixed steps run eagerly. With TP, every
rank captures the same buckets in the same order, so the NCCL collectives inside
the graphs line up.

A replay moves its inputs in one host-to-device copy: [n, m] and the StepPlan's body
([ids, positions, slots, query lens, context, tables[n, m], sample_tokens]) go to pinned
memory, and a kernel captured at the head of each graph spreads them over the graph's
static inputs and pads the rows past n.

With TP 1 each graph also ends with the argmax of its logits (first index of each row's
maximum, as torch.argmax), so an all-greedy step reads back only the token ids."""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.triton_ops import argmax, unpack_decode_inputs


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
        self.max_blocks = max_blocks
        self.packed = torch.zeros(2 + 6 * self.max_batch + self.max_batch * max_blocks, dtype=torch.long, device=dev)
        # two pinned staging buffers, used in turn; each one's event marks its last copy done
        self.staging = [torch.zeros(0, dtype=torch.long) for _ in range(2)]
        self.staging_np = [s.numpy() for s in self.staging]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.views: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{}, {}]  # size -> (device, staging) slices
        self.bucket = [next(x for x in self.buckets if x >= n) if n else 0 for n in range(self.max_batch + 1)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}     # logits (TP 1) or hidden states (TP > 1)
        self.greedy: dict[int, torch.Tensor] = {}     # TP 1: argmax of each row of logits

    def fits(self, plan) -> bool:
        t, n, m, _ = plan.dims
        return t == n and 0 < n <= self.max_batch and m <= self.max_blocks

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:b], block_tables=self.tables[:b],
                                 context_lens=self.context[:b], query_lens=[1] * b, context_lens_host=[],
                                 decode_rows=torch.empty(0), decode_tokens=torch.empty(0), prefill_rows=[],
                                 triton=True, max_query_len=1)

    def _unpack(self, b: int) -> None:
        unpack_decode_inputs(self.packed, self.ids[:b], self.positions[:b], self.slots[:b], self.context[:b],
                             self.tables[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        model, pool = self.runner.model, None
        tp1 = self.runner.cfg.tp == 1
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(b)
            for _ in range(2):  # warm up (Triton compiles, allocator settles); packed n = 0: all padding
                self._unpack(b)
                logits = model.compute_logits(model(self.ids[:b], self.positions[:b], meta))
                if tp1:
                    argmax(logits)
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._unpack(b)
                hidden = model(self.ids[:b], self.positions[:b], meta)
                # with TP the LM head's gather (point-to-point) runs eagerly after the replay
                self.logits[b] = model.compute_logits(hidden) if tp1 else hidden
                if tp1:
                    self.greedy[b] = argmax(self.logits[b])
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)

    def replay(self, plan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Run a decode step that fits(); returns the sampled rows' logits (None on TP ranks
        other than 0) and, with TP 1, their argmax (else None), both on the device."""
        _, n, m, s = plan.dims
        b = self.bucket[n]
        size = 2 + plan.body.size
        i, self.turn = self.turn, self.turn ^ 1
        if self.copied[i] is not None:
            self.copied[i].synchronize()  # the copy from two steps ago has long read this buffer
        else:
            self.copied[i] = torch.cuda.Event()
        if self.staging[i].numel() < size:
            self.staging[i] = torch.empty(min(max(size, 4096, 2 * self.staging[i].numel()), self.packed.numel()),
                                          dtype=torch.long, pin_memory=True)
            self.staging_np[i] = self.staging[i].numpy()
            self.views[i].clear()
        host = self.staging_np[i]  # numpy: far cheaper per piece than torch ops
        host[0], host[1] = n, m
        host[2:size] = plan.body
        views = self.views[i].get(size)
        if views is None:  # a steady batch changes size once every block_size steps
            if len(self.views[i]) >= 64:
                self.views[i].clear()
            views = self.views[i][size] = (self.packed[:size], self.staging[i][:size])
        views[0].copy_(views[1], non_blocking=True)
        self.copied[i].record()
        self.graphs[b].replay()
        greedy = self.greedy.get(b)
        if s == n:  # every row samples (a decode step's sample rows ascend, so S == N is all of them)
            out = self.logits[b][:n]
            ids = None if greedy is None else greedy[:n]
        else:
            rows = self.packed[size - s:size]
            out = self.logits[b][rows]
            ids = None if greedy is None else greedy[rows]
        if self.runner.cfg.tp > 1:
            out = self.runner.model.compute_logits(out)
        return out, ids
