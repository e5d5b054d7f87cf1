"""Runs the model on one TP rank: owns the weights, the KV pool and the step inputs.

Rank 0 turns a scheduled batch into a StepPlan, a handful of int64 tensors packed
into one buffer so it can be broadcast to the other ranks (no pickling).

A KV connector worker (engine/kv_connector.py), where the node runs one, moves KV
to and from other nodes: a step with saves records an event after each layer (GPU)
and calls the worker's save_layer from each layer's hook, so a transport can send a
layer group while the host queues the next layers and the device computes them."""
from __future__ import annotations

import array
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pdserve.engine import parallel
from pdserve.engine.attention import AttentionMetadata
from pdserve.common.config import EngineConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorSpec, KVPoll, KVSave
from pdserve.engine.loader import init_dummy_weights, load_config, load_weights
from pdserve.engine.model import CausalLM, ModelSpec



@dataclass
class StepPlan:
    input_ids: torch.Tensor      # [T]
    positions: torch.Tensor      # [T]
    slot_mapping: torch.Tensor   # [T]
    query_lens: torch.Tensor     # [N]
    context_lens: torch.Tensor   # [N]
    block_tables: torch.Tensor   # [N, M]
    sample_tokens: torch.Tensor  # [S] flat token index whose logits are wanted

    @classmethod
    def build(cls, seqs, num_new_tokens: list[int], sample_rows: list[int], block_size: int) -> "StepPlan":
        if sum(num_new_tokens) == len(num_new_tokens):  # one token each (a decode step): in arrays
            return cls._one_each(seqs, sample_rows, block_size)
        ids, pos, slots, qlens, clens, starts = [], [], [], [], [], []
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            starts.append(len(ids))
            ids.extend(seq.token_ids(start, start + n))
            pos.extend(range(start, start + n))
            _extend_slots(slots, seq.block_table, start, start + n, block_size)
            qlens.append(n)
            clens.append(start + n)
        sample = [starts[i] + num_new_tokens[i] - 1 for i in sample_rows]
        t = _long
        return cls(t(ids), t(pos), t(slots), t(qlens), t(clens), torch.from_numpy(_tables(seqs)), t(sample))

    @classmethod
    def _one_each(cls, seqs, sample_rows: list[int], block_size: int) -> "StepPlan":
        """build() for a step of one new token per sequence: the positions, slots and
        context lengths computed on arrays rather than sequence by sequence."""
        n = len(seqs)
        pos = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        ids = [s.token_at(p) for s, p in zip(seqs, pos.tolist())]
        tables = _tables(seqs)
        slots = tables[np.arange(n), pos // block_size] * block_size + pos % block_size
        t = torch.from_numpy
        return cls(_long(ids), t(pos), t(slots), torch.ones(n, dtype=torch.long), t(pos + 1), t(tables),
                   _long(sample_rows))

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.block_tables.shape
        header = torch.tensor([self.input_ids.numel(), n, m, self.sample_tokens.numel()], dtype=torch.long)
        body = torch.cat([self.input_ids, self.positions, self.slot_mapping, self.query_lens,
                          self.context_lens, self.block_tables.flatten(), self.sample_tokens])
        return header, body

    @classmethod
    def unpack(cls, header: torch.Tensor, body: torch.Tensor) -> "StepPlan":
        t, n, m, s = header.tolist()
        parts = body.split([t, t, t, n, n, n * m, s])
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5].view(n, m), parts[6])

    @staticmethod
    def body_numel(header: torch.Tensor) -> int:
        t, n, m, s = header.tolist()
        return 3 * t + 2 * n + n * m + s


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_path: Path, rank: int, kv_connector: KVConnectorSpec | None = None):
        self.cfg, self.rank = cfg, rank
        self.device = cfg.rank_device(rank)
        self.dtype = cfg.torch_dtype()
        self.hf_config = load_config(model_path)
        self.spec = ModelSpec.from_hf(self.hf_config)
        self.max_model_len = min(cfg.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)
        window = getattr(self.hf_config, "sliding_window", None)
        if window and (self.spec.model_type == "mistral" or getattr(self.hf_config, "use_sliding_window", False)):
            self.max_model_len = min(self.max_model_len, window)  # the window never comes into play
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif cfg.tp > 1:
            parallel.share_cpu_threads(cfg.tp)
        torch.set_default_dtype(self.dtype)
        with torch.device(self.device):
            self.model = CausalLM(self.spec, self.hf_config, self.max_model_len)
        torch.set_default_dtype(torch.float32)
        if cfg.load_format == "dummy":
            init_dummy_weights(self.model)
        else:
            load_weights(self.model, model_path)
        self.model.eval()
        self.kv_heads = self.spec.kv_heads_per_rank(cfg.tp)
        self.use_triton = self.device.type == "cuda" and _triton_ok(self.spec.head_dim, cfg.block_size)
        self.graphs = None
        self.prefill_graphs = None
        self.inputs = None               # the Triton path's one-copy step inputs
        if self.use_triton:
            from pdserve.engine.step_inputs import DeviceInputs
            self.inputs = DeviceInputs(self.device)
        self.connector = None            # the KV connector worker, if the node runs one
        self._saving = False             # a step with KV saves is queuing its layers
        self._layer_events: list | None = None
        self._kv_known: set[int] = set()  # keys of this rank's live transfers
        self._kv_ended: dict[int, str] = {}
        self.forward_queued: tuple[float, float] | None = None  # last eager step: (perf_counter, thread_time)
        self.num_blocks = self._pool_blocks()
        self.kv = KVCache(self.spec.num_layers, self.num_blocks, cfg.block_size, self.kv_heads,
                          self.spec.head_dim, self.dtype, self.device)
        self.kv.bind([layer.self_attn.attn for layer in self.model.layers])
        if self.use_triton and not cfg.enforce_eager:
            from pdserve.engine.cuda_graphs import DecodeGraphs
            pool = None
            if cfg.prefill_graphs:
                from pdserve.engine.prefill_graphs import PrefillGraphs
                self.prefill_graphs = PrefillGraphs(self, cfg.max_num_batched_tokens, cfg.max_num_seqs)
                pool = self.prefill_graphs.capture()
            self.graphs = DecodeGraphs(self, min(cfg.max_num_seqs, 512))
            self.graphs.capture(pool)
        if kv_connector is not None:
            self.connector = kv_connector.build(rank, cfg.tp)
            self.connector.register_kv_cache(self.kv, self.device)
            for i, layer in enumerate(self.model.layers):
                layer.register_forward_hook(partial(self._layer_done, i))

    def _pool_blocks(self) -> int:
        per_block = KVCache.bytes_per_block(self.spec.num_layers, self.cfg.block_size, self.kv_heads,
                                            self.spec.head_dim, self.dtype)
        if self.cfg.kv_blocks is not None:
            blocks = self.cfg.kv_blocks
        elif self.device.type == "cuda":
            peak = self._profile_activations()
            free, _ = torch.cuda.mem_get_info(self.device)
            graph_reserve = 0 if self.cfg.enforce_eager else 256 << 20
            if not self.cfg.enforce_eager and self.cfg.prefill_graphs:
                graph_reserve += peak  # the prefill graphs' pool holds the largest step's activations
            blocks = int((free - peak - graph_reserve) * self.cfg.gpu_memory_utilization) // per_block
        else:
            blocks = max(1, (512 << 20) // per_block)  # 512 MiB by default on CPU
        n = torch.tensor([blocks], dtype=torch.long, device=self.device)
        if self.cfg.tp > 1:  # every rank must agree on the pool size
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        return int(n.item())

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak activation memory of the largest step (max_num_batched_tokens as one
        prompt), measured with a one-block scratch cache whose writes go nowhere."""
        n = self.cfg.max_num_batched_tokens
        scratch = KVCache(self.spec.num_layers, 1, self.cfg.block_size, self.kv_heads, self.spec.head_dim,
                          self.dtype, self.device)
        scratch.bind([layer.self_attn.attn for layer in self.model.layers])
        plan = StepPlan(torch.zeros(n, dtype=torch.long), torch.arange(n) % self.max_model_len,
                        torch.full((n,), -1, dtype=torch.long), torch.tensor([n]), torch.tensor([n]),
                        torch.zeros(1, -(-n // self.cfg.block_size), dtype=torch.long), torch.tensor([n - 1]))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.execute(plan)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        # a short prompt too: its kernel variants get loaded now, not later behind a
        # NCCL KV transfer still spinning on the device (a first load waits for it)
        m = min(16, n)
        self.execute(StepPlan(torch.zeros(m, dtype=torch.long), torch.arange(m), torch.full((m,), -1, dtype=torch.long),
                              torch.tensor([m]), torch.tensor([m]), torch.zeros(1, -(-m // self.cfg.block_size),
                                                                               dtype=torch.long), torch.tensor([m - 1])))
        torch.cuda.synchronize(self.device)
        del scratch
        torch.cuda.empty_cache()
        return peak

    def export_kv(self, layer_start: int, num_layers: int, block_ids: list[int]) -> list[list[torch.Tensor]] | None:
        """On rank 0: [layer][rank] KV shards of the given blocks (collective over the TP group)."""
        mine = torch.stack([self.kv.export_layer(l, block_ids) for l in range(layer_start, layer_start + num_layers)])
        parts = parallel.gather(mine, self.cfg.tp)
        return None if parts is None else [[p[i] for p in parts] for i in range(num_layers)]

    def check_kv_shards(self, num_blocks: int, layers: list[list[torch.Tensor]]) -> None:
        """Raise ValueError unless layers is [layer][rank] of this node's shard shape."""
        expected = (2, num_blocks, self.cfg.block_size, self.kv_heads, self.spec.head_dim)
        for shards in layers:
            if len(shards) != self.cfg.tp:
                raise ValueError(f"got KV shards for {len(shards)} ranks, expected {self.cfg.tp}")
            for t in shards:
                if tuple(t.shape) != expected:
                    raise ValueError(f"KV shard of shape {tuple(t.shape)}, expected {expected}")

    def import_kv(self, entries: list[tuple[int, int, list[int]]],
                  data: list[list[list[torch.Tensor]]] | None) -> None:
        """Write a batch of KV into blocks on every rank (collective): entries are
        (layer_start, num_layers, block_ids); data (rank 0 only) is each entry's [layer][rank] shards."""
        bs, h, d = self.cfg.block_size, self.kv_heads, self.spec.head_dim
        sizes = [n * 2 * len(blocks) * bs * h * d for _, n, blocks in entries]
        out = torch.empty(sum(sizes), dtype=self.dtype, device=self.device)
        parts = None
        if data is not None:
            parts = [torch.cat([shards[r].reshape(-1) for layers in data for shards in layers])
                     .to(self.device, self.dtype) for r in range(self.cfg.tp)]
        parallel.scatter(parts, out, self.cfg.tp)
        offset = 0
        for (start, n, blocks), size in zip(entries, sizes):
            chunk = out[offset:offset + size].view(n, 2, len(blocks), bs, h, d)
            for i in range(n):
                self.kv.import_layer(start + i, blocks, chunk[i])
            offset += size

    # KV connector (every rank runs the same calls in the same order)

    def kv_apply(self, meta: KVConnectorMetadata) -> None:
        """Between steps: this rank's part of meta (channels, loads)."""
        mine = meta.for_rank(self.rank)
        self._kv_known.update(mine.keys)
        self.connector.apply(mine)

    def kv_poll(self, keys: list[int]) -> dict[int, tuple[KVPoll, str]]:
        """key -> (state, error) of the given keys that ended on every rank, states MIN-reduced
        over the TP group (rank 0's errors; a failure elsewhere says so). Reported ends are forgotten."""
        self._kv_ended.update(self.connector.get_finished())
        codes = []
        for key in keys:
            if key in self._kv_ended:
                codes.append(KVPoll.FAILED if self._kv_ended[key] else KVPoll.DONE)
            else:
                codes.append(KVPoll.PENDING if key in self._kv_known else KVPoll.DONE)  # nothing for this rank
        if self.cfg.tp > 1:
            t = torch.tensor(codes, dtype=torch.long, device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            codes = t.tolist()
        out = {}
        for key, code in zip(keys, codes):
            if code == KVPoll.PENDING:
                continue
            err = self._kv_ended.pop(key, "")
            self._kv_known.discard(key)
            out[key] = (KVPoll(code), err or ("" if code == KVPoll.DONE else "the transfer failed on another TP rank"))
        return out

    def _layer_done(self, layer: int, module, args, output) -> None:
        if self._saving:
            if self._layer_events is not None:
                self._layer_events[layer].record()
            self.connector.save_layer(layer)

    def close_kv(self) -> None:
        if self.connector is not None:
            self.connector.close()
            self.connector = None

    def metadata(self, plan: StepPlan) -> AttentionMetadata:
        """The torch attention path's metadata (CPU, or a GPU without the Triton kernels)."""
        dev = self.device
        qlens, clens = plan.query_lens.tolist(), plan.context_lens.tolist()
        starts = torch.cumsum(plan.query_lens, 0) - plan.query_lens
        decode_rows = [i for i, q in enumerate(qlens) if q == 1]
        return AttentionMetadata(
            slot_mapping=plan.slot_mapping.to(dev), block_tables=plan.block_tables.to(dev),
            context_lens=plan.context_lens.to(dev), query_lens=qlens, context_lens_host=clens,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev),
            decode_tokens=starts[decode_rows].to(dev),
            prefill_rows=[i for i, q in enumerate(qlens) if q > 1], query_starts_host=starts.tolist())

    @torch.inference_mode()
    def execute(self, plan: StepPlan, meta: KVConnectorMetadata | None = None) -> torch.Tensor | None:
        """Run one step; return the sampled rows' logits [S, V] in float32 on rank 0.
        A decode-only step that fits a captured CUDA graph replays it; so does any other
        step that fits a prefill graph (with KV saves too, where the graphs record layer events)."""
        sends = meta.for_rank(self.rank).saves if meta else ()
        self.forward_queued = None
        pg = self.prefill_graphs
        if self.graphs is not None and self.graphs.fits(plan) and not sends:
            logits = self.graphs.replay(plan)
        elif pg is not None and pg.fits(plan) and (not sends or pg.layer_events(plan) is not None):
            logits = self._replay_prefill(plan, sends)
        else:  # eager; a step with KV sends records an event after each layer
            logits = self._eager(plan, sends)
        return None if logits is None else logits.float()

    def _replay_prefill(self, plan: StepPlan, sends: tuple[KVSave, ...]) -> torch.Tensor | None:
        """Replay the prefill graph; the connector queues its saves after it, each layer
        group behind the event the graph records after the group's last layer."""
        pg = self.prefill_graphs
        out = self._with_sends(sends, pg.layer_events(plan) if sends else None, lambda: pg.replay(plan, self.inputs))
        if plan.sample_tokens.numel() == 0:
            return None
        return out if self.cfg.tp == 1 else self.model.compute_logits(out)

    def _eager(self, plan: StepPlan, sends: tuple[KVSave, ...]) -> torch.Tensor | None:
        if self.inputs is not None:  # one copy of every input (engine/step_inputs.py)
            ids, positions, meta, sample = self.inputs.eager(plan)
        else:
            ids, positions, meta = plan.input_ids.to(self.device), plan.positions.to(self.device), self.metadata(plan)
            sample = plan.sample_tokens
        # on GPU the connector can move each layer from its hook, while later layers are queued
        events = [torch.cuda.Event() for _ in range(self.spec.num_layers)] if sends and self.device.type == "cuda" \
            else None
        hidden = self._with_sends(sends, events, lambda: self.model(ids, positions, meta))
        if plan.sample_tokens.numel() == 0:
            return None
        return self.model.compute_logits(hidden[sample.to(self.device)])

    def _with_sends(self, sends: tuple[KVSave, ...], events: list | None, forward):
        """Run forward() (queue the step's layers) with its KV saves: the connector starts
        them before, hears of each layer from its hook (events recorded on GPU) and
        finishes them after. A failed forward aborts what it left half issued."""
        if not sends:
            out = forward()
            self.forward_queued = (time.perf_counter(), time.thread_time())  # diagnostics (StepTrace)
            return out
        self._kv_known.update(s.key for s in sends)
        self.connector.start_step(sends, events)
        self._layer_events, self._saving = events, True
        try:
            out = forward()
            self.forward_queued = (time.perf_counter(), time.thread_time())  # diagnostics (StepTrace)
            self._saving = False
            self.connector.finish_step()
        except BaseException:
            self.connector.abort_step("the forward that computes the KV failed")
            raise
        finally:
            self._layer_events, self._saving = None, False
        return out


def _long(values) -> torch.Tensor:
    """A 1-D int64 tensor of a list or array of ints: through an array's buffer, about 4x
    faster than torch.tensor(list) (a 2K-token plan holds three such lists)."""
    buf = values if isinstance(values, array.array) else array.array("q", values)
    if not buf:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(buf, dtype=torch.long).clone()


def _tables(seqs) -> np.ndarray:
    """The block tables as one int64 [sequences, longest table] array, zero-padded."""
    width = max(len(s.block_table) for s in seqs)
    tables = array.array("q")
    for s in seqs:
        tables.extend(s.block_table)
        tables.extend([0] * (width - len(s.block_table)))
    return np.frombuffer(tables, dtype=np.int64).reshape(len(seqs), width)


def _extend_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    """Append the cache slots of positions [start, end): one range per block, not one
    division per token (a 2K-token prompt's plan is built before its forward's first
    kernel, with the device idle)."""
    while start < end:
        b, off = divmod(start, block_size)
        run = min(end - start, block_size - off)
        base = table[b] * block_size + off
        slots.extend(range(base, base + run))
        start += run


def _triton_ok(head_dim: int, block_size: int) -> bool:
    from pdserve.engine.triton_attention import supported
    return supported(head_dim, block_size)
