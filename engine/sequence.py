"""One request inside the engine: its tokens, its KV blocks and its progress."""
from __future__ import annotations

import itertools
import time
from enum import Enum, auto

import torch

from pdserve.common.sampling import SamplingParams
from pdserve.engine.kv_connector import KVSave


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 prefill_only: bool = False):
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0      # tokens whose KV is in the cache
        self.block_hashes: list[int] = []  # prefix cache: chained hashes of the leading full blocks
        self.num_registered_blocks = 0    # leading blocks of block_table registered in (or linked from) the cache
        self.num_cached_tokens = 0        # prompt tokens found in the prefix cache at the last admission
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.detokenizer = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.finish_time: float | None = None
        # a prefill-only sequence stops after its first token and keeps its KV blocks
        # until release() (a prefill node exports them to a decode node first)
        self.prefill_only = prefill_only
        self.kv_save: KVSave | None = None  # KV connector: saved by the step that completes the prompt
        self.kv_skip_blocks = 0           # leading prompt blocks the receiver holds already: not sent

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        end = self.num_tokens if end is None else end
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - n)]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def append(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
