"""CUDA graphs for steps with prompt tokens, one per token-count bucket.

An eager prefill step costs the host nearly as long as the device takes to run it
(Python queueing ~150 kernels), so a process running slower than usual makes the
step, and TTFT, host-bound. A replay costs the host a small fraction of that
(docs/RESULTS.md has the figures).

A step of T tokens and n sequences (prefill, chunked prefill, decodes mixed in)
replays the smallest bucket >= T. Buckets are 16, 32, 64, then multiples of 128
up to 2048, 256 up to 4096, 512 beyond, capped at max_num_batched_tokens: the
matrix products run whole tiles of 128 or more rows anyway, so padding to the
bucket costs next to nothing; padded rows write their K/V nowhere (slot -1) and no
attention tile covers them. Every graph has room for max_num_seqs sequences: the
attention kernel runs one program per (tile, head) from the step's tile list
(engine/step_inputs.py), whose padded entries return at once.

Layer events: each graph records an external CUDA event after each layer, so a
step whose KV leaves over NCCL replays the graph and then queues the sends, each
group's gather waiting on its last layer's event (engine/model_runner.py): the KV
streams out while the later layers compute, as in an eager step.

Graphs share one memory pool (largest first, then the decode graphs); with TP,
every rank captures the same buckets in the same order."""
from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.step_inputs import BLOCK_M, DeviceInputs, Layout, max_tiles, views


def token_buckets(max_tokens: int) -> list[int]:
    out = [b for b in (16, 32, 64) if b < max_tokens]
    b = 128
    while b < max_tokens:
        out.append(b)
        b += 128 if b < 2048 else 256 if b < 4096 else 512
    return out + [max_tokens]


def external_events(n: int) -> list[torch.cuda.Event] | None:
    """n events that a graph records as nodes of its own (None where torch cannot)."""
    try:
        return [torch.cuda.Event(external=True) for _ in range(n)]
    except TypeError:
        return None


class PrefillGraphs:
    def __init__(self, runner, max_tokens: int, max_seqs: int):
        self.runner = runner
        self.buckets = token_buckets(max_tokens)
        self.max_seqs = max_seqs
        width = -(-runner.max_model_len // runner.cfg.block_size)
        self.layout = Layout(tokens=self.buckets[-1], seqs=max_seqs, tiles=max_tiles(self.buckets[-1], max_seqs),
                             table=max_seqs * width)
        self.buf = torch.zeros(self.layout.words, dtype=torch.int32, device=runner.device)
        self.dev = views(self.buf, self.layout)
        self.dev["slots"].fill_(-1)
        self.dev["work"].fill_(-1)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # logits (TP 1) or hidden states of the sample rows
        self.events: dict[int, list[torch.cuda.Event] | None] = {}

    def bucket(self, tokens: int) -> int:
        return next(b for b in self.buckets if b >= tokens)

    def fits(self, plan) -> bool:
        n, m = plan.block_tables.shape
        return plan.input_ids.numel() <= self.buckets[-1] and n <= self.max_seqs and n * m <= self.layout.table

    def layer_events(self, plan) -> list[torch.cuda.Event] | None:
        """The events the graph that runs this plan records after each layer."""
        return self.events[self.bucket(plan.input_ids.numel())]

    def _meta(self, b: int) -> AttentionMetadata:
        d = self.dev
        return AttentionMetadata(slot_mapping=d["slots"][:b], block_tables=torch.empty(0), context_lens=d["context_lens"],
                                 query_lens=[], context_lens_host=[], decode_rows=torch.empty(0),
                                 decode_tokens=torch.empty(0), prefill_rows=[], triton=True,
                                 query_starts=d["query_starts"], query_lens_dev=d["query_lens"],
                                 max_query_len=BLOCK_M, tables=d["table"], table_width=d["width"],
                                 work=d["work"][:max_tiles(b, self.max_seqs)], block_m=BLOCK_M)

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket, largest first; returns the memory pool for the decode graphs."""
        model, d = self.runner.model, self.dev
        tp1 = self.runner.cfg.tp == 1
        for b in reversed(self.buckets):
            meta = self._meta(b)
            ids, pos = d["ids"][:b], d["positions"][:b]
            for _ in range(2):  # warm up: all padding (no tile, no slot)
                hidden = model(ids, pos, meta)
                model.compute_logits(hidden[d["sample"]])
            torch.cuda.synchronize(self.runner.device)
            events = external_events(len(model.layers))
            hooks = [] if events is None else [layer.register_forward_hook(lambda *_, e=e: e.record())
                                               for layer, e in zip(model.layers, events)]
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    rows = model(ids, pos, meta)[d["sample"]]
                    self.outputs[b] = model.compute_logits(rows) if tp1 else rows
            finally:
                for h in hooks:
                    h.remove()
            pool = graph.pool()
            self.graphs[b], self.events[b] = graph, events
        torch.cuda.synchronize(self.runner.device)
        return pool

    def replay(self, plan, inputs: DeviceInputs) -> torch.Tensor:
        """Logits of the plan's sample rows (TP 1; their hidden states with TP > 1)."""
        b = self.bucket(plan.input_ids.numel())
        inputs.load(plan, self.layout, BLOCK_M, dst=self.buf, tokens=b, tiles=max_tiles(b, self.max_seqs))
        self.graphs[b].replay()
        return self.outputs[b][:plan.sample_tokens.numel()]
