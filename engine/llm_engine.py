"""The engine a node runs: requests in, tokens out, one step at a time.

    add_request -> [step: schedule -> execute on all TP ranks -> sample -> postprocess]* -> finished
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from pdserve.common.block_hash import root_hash
from pdserve.common.model_files import checkpoint_hash
from pdserve.engine.block_manager import BlockManager
from pdserve.common.config import EngineConfig
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.executor import Executor
from pdserve.engine.kv_import import KVImports
from pdserve.engine.kv_connector import KVConnectorMetadata, KVConnectorSpec, KVPoll, KVSave
from pdserve.engine.loader import load_config, load_tokenizer, resolve_model
from pdserve.engine.model import ModelSpec
from pdserve.engine.sampler import Sampler, make_generator
from pdserve.common.sampling import SamplingParams, validate_request
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.model_runner import StepPlan
from pdserve.engine.sequence import Sequence


@dataclass
class StepOutput:
    """What one step produced for one request (streaming unit)."""
    seq: Sequence
    token_id: int
    index: int          # position of token_id in the output (read on the engine's thread)
    text_delta: str
    finished: bool


@dataclass
class StepBatch:
    """What one step produced, in columns: row i is seqs[i]'s token token_ids[i] at output
    position indices[i], finish[i] its finish reason (None: still running), texts[i] its
    text delta where the engine detokenizes that sequence (else ""). Iterating it gives
    StepOutputs, for callers off the serving path."""
    seqs: list[Sequence] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self):
        for row in zip(self.seqs, self.token_ids, self.indices, self.texts, self.finish):
            yield StepOutput(*row[:4], row[4] is not None)


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    timings: dict = field(default_factory=dict)


class StepTrace:
    """Diagnostics: with PDSERVE_STEP_TRACE=DIR, each engine (process) appends one JSON line
    per step to DIR/steps-PID.jsonl: wall time at its start, tokens, whether it issued KV
    sends, host ms to queue the forward and logits, ms of device time between two events
    around them (the device's own time when the host keeps ahead of it, else the host's
    pace), and ms of the whole step up to the sampled tokens on the host. Never on in serving."""

    def __init__(self, directory: str, device: torch.device):
        os.makedirs(directory, exist_ok=True)
        self.out = open(os.path.join(directory, f"steps-{os.getpid()}.jsonl"), "a", buffering=1)
        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else []

    def start(self) -> tuple[float, float, float]:
        if self.cuda:
            self.events[0].record()
        return time.time(), time.perf_counter(), time.thread_time()

    def queued(self) -> float:
        if self.cuda:
            self.events[1].record()
        return time.perf_counter()

    def end(self, started: tuple[float, float, float], queued: float, tokens: int, sends: bool,
            forward: tuple[float, float] | None) -> None:
        """forward: (perf_counter, thread_time) once the model's layers were queued, before
        anything waits for the device (ModelRunner.forward_queued): wall time well under the
        device's means the host kept ahead; CPU time well under wall time means the thread
        was kept off a CPU (another thread holding the GIL, the OS)."""
        done = time.perf_counter()
        gpu = self.events[0].elapsed_time(self.events[1]) if self.cuda else None
        fwd = dict(forward_ms=(forward[0] - started[1]) * 1e3, forward_cpu_ms=(forward[1] - started[2]) * 1e3
                   ) if forward else {}
        self.out.write(json.dumps(dict(t=started[0], tokens=tokens, sends=sends, queue_ms=(queued - started[1]) * 1e3,
                                       gpu_ms=gpu, step_ms=(done - started[1]) * 1e3, **fwd)) + "\n")


class LLMEngine:
    def __init__(self, cfg: EngineConfig, kv_connector: KVConnectorSpec | None = None, detokenize: bool = True):
        """kv_connector: the KV connector worker every TP rank builds (engine/kv_connector.py).
        detokenize=False: only sequences with stop strings are detokenized here (their end
        depends on the text); the caller detokenizes the others off the engine's thread."""
        self.cfg, self.kv_connector, self.detokenize = cfg, kv_connector, detokenize
        self.executor: Executor | None = None
        # called on this thread with each save the coming step starts, in that order
        # (a transport whose receiver must post in send order announces it here)
        self.on_kv_save: Callable[[KVSave], None] | None = None

    def start(self) -> "LLMEngine":
        self.model_path = resolve_model(self.cfg.model)
        ModelSpec.from_hf(load_config(self.model_path)).check_tp(self.cfg.tp)  # before spawning ranks
        self.tokenizer = load_tokenizer(self.model_path)
        self.executor = Executor(self.cfg, self.model_path, self.kv_connector)
        self.executor.start()
        runner = self.executor.runner
        self.spec, self.max_model_len, self.device = runner.spec, runner.max_model_len, runner.device
        self.eos_token_ids = _eos_ids(runner.hf_config, self.model_path)
        self.imports = KVImports(runner.kv, runner.device, self.cfg.tp, runner.check_kv_shards,
                                 self.executor.import_kv)
        self.hash_root = root_hash(cache_identity(self.cfg, runner.dtype))
        self.blocks = BlockManager(runner.num_blocks, self.cfg.block_size,
                                   self.hash_root if self.cfg.prefix_caching else None)
        self.scheduler = Scheduler(self.blocks, self.cfg.max_num_seqs,
                                   max(self.cfg.max_num_batched_tokens, self.cfg.max_num_seqs),
                                   self.cfg.chunked_prefill)
        if not self.cfg.chunked_prefill and self.cfg.max_num_batched_tokens < self.max_model_len:
            self.scheduler.budget = self.max_model_len  # a whole prompt must fit in one step
        self.sampler = Sampler()
        trace_dir = os.environ.get("PDSERVE_STEP_TRACE")
        self.trace = StepTrace(trace_dir, self.device) if trace_dir else None
        return self

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None

    def __enter__(self) -> "LLMEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # requests

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, prefill_only: bool = False,
                    kv_save: KVSave | None = None, kv_skip_blocks: int = 0) -> Sequence:
        """Validate and queue a request; raises ValueError with a readable message.
        A prefill_only request finishes after its first token ("prefilled") and keeps
        its KV blocks for export until release(). kv_save has the KV connector save its
        prompt KV during the step that completes its prefill (the engine adds the blocks);
        that save and export_kv leave out the first kv_skip_blocks blocks (the receiver
        has them cached)."""
        self.validate(prompt_token_ids, params)
        if not 0 <= kv_skip_blocks < self.blocks.blocks_for(len(prompt_token_ids)):
            raise ValueError(f"cannot skip {kv_skip_blocks} of the prompt's "
                             f"{self.blocks.blocks_for(len(prompt_token_ids))} KV blocks")
        seq = self._new_sequence(prompt_token_ids, params, request_id, prefill_only)
        seq.kv_save, seq.kv_skip_blocks = kv_save, kv_skip_blocks
        self.scheduler.add(seq)
        return seq

    def add_prefilled(self, prompt_token_ids: list[int], first_token: int, params: SamplingParams,
                      block_ids: list[int], request_id: str | None = None) -> StepOutput:
        """Admit a request whose prompt KV already sits in block_ids (reserved with
        reserve() and filled through import_kv or write_kv) and whose first token was
        sampled elsewhere; it joins the running batch at the next step. The returned
        output is the first token's, finished if that token already ends the request."""
        self.validate(prompt_token_ids, params)
        self.imports.flush()  # its KV in place on every rank before it can run
        if len(block_ids) < self.blocks.blocks_for(len(prompt_token_ids)):
            raise ValueError(f"{len(block_ids)} blocks cannot hold {len(prompt_token_ids)} prompt tokens")
        seq = self._new_sequence(prompt_token_ids, params, request_id, False)
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = len(prompt_token_ids)
        self.blocks.cache_full(seq)
        self.scheduler.add_running(seq)
        # The prefill node sent what its detokenizer's step() gave for the first token; this
        # one, fed the same ids, holds back the same part and emits it later.
        delta, reason = self._postprocess(seq, first_token)
        return StepOutput(seq, first_token, 0, delta, reason is not None)

    def reserve(self, num_tokens: int, cached: list[int] = ()) -> list[int]:
        """Blocks for num_tokens of KV (a decode node's reservation): the cached blocks
        (cached_prefix()) linked first, then fresh ones; MemoryError (nothing taken) if short."""
        cached = list(cached)
        self.blocks.acquire(cached)
        try:
            return cached + self.blocks.allocate(self.blocks.blocks_for(num_tokens) - len(cached))
        except MemoryError:
            self.blocks.free(cached)
            raise

    def cached_prefix(self, prompt_token_ids: list[int]) -> list[int]:
        """The cached blocks holding the prompt's leading blocks, all but its last block (a
        transfer moves at least one block); no reference taken."""
        seq = Sequence(prompt_token_ids, SamplingParams())
        return self.blocks.lookup(seq, (self.blocks.blocks_for(len(prompt_token_ids)) - 1) * self.blocks.block_size)

    def blocks_needed(self, num_tokens: int, cached: list[int]) -> int:
        """How many free blocks reserve(num_tokens, cached) takes (cached ones unused now included)."""
        idle = sum(1 for b in cached if self.blocks.ref_counts[b] == 0)
        return self.blocks.blocks_for(num_tokens) - len(cached) + idle

    def release(self, seq_or_blocks) -> None:
        """Free a finished prefill-only sequence's blocks, or a list of reserved blocks."""
        self.imports.flush()  # nothing written into them lands after they are reused
        if isinstance(seq_or_blocks, Sequence):
            self.scheduler.release(seq_or_blocks)
        else:
            self.blocks.free(list(seq_or_blocks))

    def export_kv(self, seq: Sequence, layer_start: int = 0, num_layers: int | None = None) -> list[list[torch.Tensor]]:
        """The prompt KV of `seq` (less its first kv_skip_blocks blocks), [layer][tp rank], each
        shard one contiguous [2, blocks, block_size, rank's KV heads, head_dim] tensor (what a
        transport sends)."""
        n = self.blocks.blocks_for(seq.num_prompt_tokens)
        num_layers = self.spec.num_layers - layer_start if num_layers is None else num_layers
        return self.executor.export_kv(layer_start, num_layers, seq.block_table[seq.kv_skip_blocks:n])

    def import_kv(self, block_ids: list[int], layer_start: int, layers: list[list[torch.Tensor]]) -> None:
        """Write [layer][tp rank] KV shards into reserved blocks on every rank, now."""
        self.imports.flush()
        self.executor.import_kv([(list(block_ids), layer_start, layers)])

    def write_kv(self, block_ids: list[int], layer_start: int, layers: list[list[torch.Tensor]]) -> None:
        """The one call other threads may make: write [layer][tp rank] KV shards into
        reserved blocks without waiting for the engine thread (engine/kv_import.py); they
        are in place on every rank by the next step, admission or release."""
        self.imports.write(block_ids, layer_start, layers)

    # KV connector (engine/kv_connector.py)

    def kv_apply(self, meta: KVConnectorMetadata) -> None:
        """Run meta's channel changes and loads on every rank now; blocks until channels are joined."""
        self.executor.kv_apply(meta)

    def kv_finished(self, keys: list[int]) -> dict[int, tuple[bool, str]]:
        """Transfers among keys that ended on every rank: key -> (ok, error)."""
        if not keys:
            return {}
        return {k: (state == KVPoll.DONE, err) for k, (state, err) in self.executor.kv_poll(keys).items()}

    def _new_sequence(self, prompt_token_ids, params, request_id, prefill_only) -> Sequence:
        seq = Sequence(prompt_token_ids, params, request_id, prefill_only)
        seq.generator = make_generator(params.seed, self.device)
        if self.tokenizer is not None and (self.detokenize or params.stop):
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        return seq

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.spec.vocab_size, self.max_model_len,
                         self.cfg.max_tokens_limit)
        n = len(prompt_token_ids)
        if self.blocks.blocks_for(n + params.max_tokens) > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_tokens needs more KV blocks than the pool has "
                             f"({self.blocks.num_blocks} x {self.blocks.block_size} tokens)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a model with a tokenizer")

    def abort(self, seq: Sequence) -> None:
        self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # stepping

    def step(self) -> StepBatch:
        self.imports.flush()
        batch = self.scheduler.schedule()
        out = StepBatch()
        if not batch.seqs:
            return out
        rows = [i for i in range(len(batch)) if batch.samples(i)]
        plan = StepPlan.build(batch.seqs, batch.num_new_tokens, rows, self.cfg.block_size)
        sends = [seq for seq, n in zip(batch.seqs, batch.num_new_tokens)
                 if seq.kv_save and seq.num_computed_tokens + n >= seq.num_prompt_tokens]
        meta = self._saves(sends) if sends else None
        started = self.trace.start() if self.trace else None
        logits = self.executor.execute(plan, meta)
        queued = self.trace.queued() if self.trace else 0.0
        self.scheduler.advance(batch)
        if not rows:
            return out
        seqs = [batch.seqs[i] for i in rows]
        tokens = self.sampler(logits, [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                              [s.output_token_ids for s in seqs], [s.generator for s in seqs]).tolist()
        if started:
            runner = self.executor.runner
            self.trace.end(started, queued, sum(batch.num_new_tokens), bool(sends), runner.forward_queued)
        out.seqs, out.token_ids = seqs, tokens
        for seq, tok in zip(seqs, tokens):
            delta, reason = self._postprocess(seq, tok)
            out.indices.append(len(seq.output_token_ids) - 1)
            out.texts.append(delta)
            out.finish.append(reason)
        return out

    def _saves(self, seqs: list[Sequence]) -> KVConnectorMetadata:
        """The saves of the sequences whose prompts this step completes, with their blocks."""
        saves = []
        for seq in seqs:
            blocks = seq.block_table[seq.kv_skip_blocks:self.blocks.blocks_for(seq.num_prompt_tokens)]
            save, seq.kv_save = replace(seq.kv_save, block_ids=tuple(blocks)), None
            if self.on_kv_save is not None:
                self.on_kv_save(save)
            saves.append(save)
        return KVConnectorMetadata(saves=tuple(saves))

    def _postprocess(self, seq: Sequence, token: int) -> tuple[str, str | None]:
        """Append a sampled token; its text delta (where detokenized here) and finish reason."""
        seq.append(token)
        p = seq.params
        reason = None
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        delta = ""
        if stop_token:
            reason = "stop"
        elif seq.detokenizer is not None:
            delta = seq.detokenizer.step(token)
            if seq.detokenizer.stopped:
                reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is None and seq.prefill_only:
            reason = "prefilled"
        if reason is not None:
            # A prefilled request goes on elsewhere: what step() held back (a partial character,
            # the tail a stop string may yet claim) is the decode node's to emit.
            if seq.detokenizer is not None and not seq.detokenizer.stopped and reason != "prefilled":
                delta += seq.detokenizer.flush()
            seq.finish_time = time.monotonic()
            self.scheduler.finish(seq, reason, keep_blocks=seq.prefill_only)
        return delta, reason

    # offline use

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run prompts to completion with continuous batching; results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while any(not s.is_finished for s in seqs):
            self.step()
        return [self.completion(s) for s in seqs]

    def completion(self, seq: Sequence) -> Completion:
        return Completion(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids),
                          seq.detokenizer.text if seq.detokenizer is not None else None,
                          seq.finish_reason or "", timings(seq))


def timings(seq: Sequence) -> dict:
    t0, first = seq.arrival_time, seq.first_token_time
    end = seq.finish_time
    out = {"ttft_s": None if first is None else first - t0, "e2e_s": None if end is None else end - t0}
    n = len(seq.output_token_ids)
    out["tpot_s"] = (end - first) / (n - 1) if end is not None and first is not None and n > 1 else None
    return out


def cache_identity(cfg: EngineConfig, dtype) -> str:
    """What the prefix cache's hash chain starts from: KV is reused only between engines
    of the same weights, dtype, block size and load format."""
    return f"{checkpoint_hash(cfg.model)}|{str(dtype).removeprefix('torch.')}|{cfg.block_size}|{cfg.load_format}"


def _eos_ids(hf_config, model_path) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig
        sources.append(GenerationConfig.from_pretrained(model_path, local_files_only=True).eos_token_id)
    except (OSError, ValueError):
        pass
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids
