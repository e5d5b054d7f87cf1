"""The model the cluster serves, and its tokenizer.

With `--model` the coordinator loads the tokenizer at start and admits only nodes
whose checkpoint is that model. Without it, the served model is agreed: the model
of the live nodes; while none is live, the next node to register sets it. Model
info and tokenizer change together, only once the tokenizer has loaded: a
registration cancelled midway (its deadline) leaves the previous state whole, and
the load itself goes on, shared by the registrations that retry."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from pdserve.wire.rpc import RpcError
from pdserve.v1 import node_pb2

log = logging.getLogger("pdserve.coordinator")


class ServedModel:
    def __init__(self, configured: str | None, tokenize_threads: int = 2):
        self.configured = configured
        self.info: node_pb2.ModelInfo | None = None
        self.tokenizer = None
        self.checkpoint = ""             # the configured model's checkpoint hash
        self._loads: dict[str, asyncio.Task] = {}
        # prompts are tokenized here, never on the event loop (heartbeats must go on)
        self.pool = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="pdserve-tokenize")

    async def start(self) -> None:
        if self.configured:
            self.checkpoint, self.tokenizer = await asyncio.to_thread(_load, self.configured)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def admit(self, model: node_pb2.ModelInfo, live_hashes: set[str]) -> None:
        """Check a registering node's model; adopt it when no live node serves another.
        RpcError FAILED_PRECONDITION for a mismatch, UNAVAILABLE if the tokenizer cannot load."""
        if self.configured and model.checkpoint_hash != self.checkpoint:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"node serves {model.name!r}, this coordinator serves {self.configured!r}")
        if self.info is not None and model.compat_hash == self.info.compat_hash:
            return
        others = live_hashes - {model.compat_hash}
        if others:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"node serves a different model/layout ({model.name}) than the live nodes "
                           f"({self.info.name if self.info else '?'})")
        tokenizer = self.tokenizer if self.configured else await self._tokenizer(model.name)
        if self.info is not None:
            log.warning("served model changes from %s to %s (no live node served the former)",
                        self.info.name, model.name)
        self.info, self.tokenizer = model, tokenizer

    async def follow(self, model: node_pb2.ModelInfo) -> None:
        """A worker: serve the model its supervisor admitted (its tokenizer loads first)."""
        if self.info is not None and model.compat_hash == self.info.compat_hash:
            return
        tokenizer = self.tokenizer if self.configured else await self._tokenizer(model.name)
        self.info, self.tokenizer = model, tokenizer

    async def _tokenizer(self, name: str):
        task = self._loads.get(name)
        if task is None:
            task = self._loads[name] = asyncio.ensure_future(asyncio.to_thread(_load, name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or self._loads.pop(name, None))
        try:
            return (await asyncio.shield(task))[1]  # a cancelled registration leaves the load running
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"coordinator could not load the tokenizer of "
                                                        f"{name!r}: {type(e).__name__}: {e}") from None

    async def run(self, fn, *args):
        """fn(*args) on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def _load(name: str):
    """(checkpoint hash, tokenizer or None) of a model folder, .gguf file or the default."""
    from pdserve.common.model_files import checkpoint_hash, load_tokenizer  # no torch: the coordinator never loads it
    return checkpoint_hash(name or None), load_tokenizer(name or None)
