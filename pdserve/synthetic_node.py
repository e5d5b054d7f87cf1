"""A synthetic node for tests and the relay benchmark: no model, no torch. It registers
with a coordinator as a real node does (one colocated node, or a decode node and a
prefill node in this process), answers Reserve, Renew, Prefill, Subscribe and Abort
with the real wire code, and emits tokens as fast as asked: every `step_period_s`, each
running request gets `tokens_per_step` tokens, sent as one TokenBatch per step to each
subscriber. Token k of a request is synthetic_token(prompt, k), so a client can check
every token it got.

    python -m pdserve.synthetic_node --coordinator HOST:PORT [--role both|pair] [--step-period 0.005]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdserve.common.flags import add_flags, from_args, opt
from pdserve.common.model_files import folder_hash
from pdserve.common.recent_ids import RecentIds
from pdserve.decode_node.subscribers import Subscriber
from pdserve.node.agent import NodeAgent
from pdserve.process import run_until_signal
from pdserve.wire.rpc import RpcError, ServerHandle
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.synthetic")
LOCAL: dict[str, "SyntheticNode"] = {}  # kv_endpoint -> decode node of this process (the pair's "KV plane")


@dataclass
class SyntheticConfig:
    coordinator: str = opt(help="the coordinator's gRPC address")
    listen: str = opt("127.0.0.1:0", "HOST:PORT of the node's gRPC server (pair: the decode node's; the prefill "
                                     "node takes any free port on that host)")
    role: str = opt("both", "both: one colocated node; pair: a decode node and a prefill node (the prefill node hands "
                            "KV only to its own process's decode node: one pair process per coordinator)",
                    choices=("both", "pair"))
    step_period_s: float = opt(0.005, "seconds between steps (0: as fast as the event loop goes)",
                               flag="--step-period")
    tokens_per_step: int = opt(1, "tokens each running request gets per step")
    max_num_seqs: int = opt(4096, "requests reserved or running at once; Reserve refuses more "
                                  "(RESOURCE_EXHAUSTED) and the coordinator queues them")
    vocab_size: int = opt(32000, "vocabulary the node reports")
    max_model_len: int = opt(4096, "longest prompt + output the node reports")
    max_unread_batches: int = opt(4096, "a subscriber this many step batches behind is cut off")
    model: str | None = opt(None, "folder with a config.json to report as the model (default: one written "
                                  "to a temporary folder)")


def synthetic_token(prompt: list[int], index: int, vocab_size: int = 32000) -> int:
    """The token a synthetic node emits at output index `index` for `prompt`."""
    return (_seed(prompt) + 7919 * index) % vocab_size


def _seed(prompt: list[int]) -> int:
    return zlib.crc32(b"".join(int(t).to_bytes(8, "little", signed=True) for t in prompt))


@dataclass
class Entry:
    """One request's tokens of one step (or its first update, with its admission time)."""
    request_id: str
    index: int
    tokens: list[int]
    finish: int = 0
    decode_start: float = 0.0
    subscriber: str = ""                       # "" : every subscriber gets it


def token_batch(entries: list[Entry]) -> node_pb2.TokenBatch:
    """The step's columnar TokenBatch (a row of tokens per request, admission times as events):
    the one place here that knows its format."""
    batch = node_pb2.TokenBatch(
        request_ids=[e.request_id for e in entries], first_index=[e.index for e in entries],
        counts=[len(e.tokens) for e in entries], token_ids=[t for e in entries for t in e.tokens],
        texts=["".join(f"{t} " for t in e.tokens) for e in entries], finish_reasons=[e.finish for e in entries])
    batch.events.extend(node_pb2.TokenEvent(request_id=e.request_id, decode_start=e.decode_start,
                                            kv_ready=e.decode_start) for e in entries if e.decode_start)
    return batch


@dataclass
class Stream:
    """A request this node holds: reserved (next_index 0) or running."""
    prompt: list[int]
    seed: int
    max_tokens: int
    stop_ids: frozenset
    epoch: int
    subscriber: str = ""                       # "" : every subscriber gets its tokens
    next_index: int = 0
    decode_start: float = field(default=0.0)


class SyntheticNode(node_pb2_grpc.DecodeNodeServicer, node_pb2_grpc.PrefillNodeServicer):
    def __init__(self, cfg: SyntheticConfig, role: int, model_dir: Path):
        self.cfg, self.role, self.model_dir = cfg, role, model_dir
        self.reserved: dict[str, Stream] = {}
        self.running: dict[str, Stream] = {}
        self.subscribers: dict[Subscriber, str] = {}   # -> its subscriber id ("" : today's, one per epoch)
        self.aborted, self.seen = RecentIds(), RecentIds()
        self.work = asyncio.Event()
        self.steps = 0
        self.kv_endpoint = ""
        self.task: asyncio.Task | None = None

    async def start(self) -> str:
        name = "pdserve.v1.DecodeNode" if self.role != api_pb2.ROLE_PREFILL else "pdserve.v1.PrefillNode"
        listen = self.cfg.listen if self.role != api_pb2.ROLE_PREFILL else self.cfg.listen.rsplit(":", 1)[0] + ":0"
        self.server = ServerHandle(listen, [name])
        if self.role != api_pb2.ROLE_PREFILL:
            node_pb2_grpc.add_DecodeNodeServicer_to_server(self, self.server.server)
        if self.role != api_pb2.ROLE_DECODE:
            node_pb2_grpc.add_PrefillNodeServicer_to_server(self, self.server.server)
        self.address = await self.server.start()
        if self.role == api_pb2.ROLE_DECODE:
            self.kv_endpoint = f"synthetic://{self.address}"
            LOCAL[self.kv_endpoint] = self
        self.task = asyncio.create_task(self._steps())
        self.agent = NodeAgent(self.cfg.coordinator, self._register_request, self._load,
                               on_registered=self._on_registered)
        await self.agent.start()
        await self.server.ready()
        return self.address

    async def close(self, grace_s: float = 1.0) -> None:
        await self.server.drain(grace_s)
        await self.agent.close()
        if self.task is not None:
            self.task.cancel()
        LOCAL.pop(self.kv_endpoint, None)

    # registration

    def _register_request(self) -> node_pb2.RegisterRequest:
        c = self.cfg
        model = node_pb2.ModelInfo(name=str(self.model_dir), num_layers=1, num_kv_heads=1, head_dim=1, block_size=1,
                                   dtype="synthetic", vocab_size=c.vocab_size, max_model_len=c.max_model_len,
                                   compat_hash=f"synthetic-{c.vocab_size}-{c.max_model_len}",
                                   checkpoint_hash=folder_hash(self.model_dir))
        return node_pb2.RegisterRequest(role=self.role, address=self.address, kv_endpoint=self.kv_endpoint, tp=1,
                                        model=model, kv_blocks_total=c.max_num_seqs)

    def _load(self) -> node_pb2.HeartbeatRequest:
        held = len(self.reserved) + len(self.running)
        return node_pb2.HeartbeatRequest(kv_blocks_free=max(0, self.cfg.max_num_seqs - held),
                                         running=len(self.running), queued=len(self.reserved))

    def _on_registered(self, epoch: int) -> None:
        self._drop(lambda s: s.epoch != epoch)

    def _epoch(self, epoch: int) -> int:
        if epoch in (0, self.agent.epoch):
            return self.agent.epoch
        raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"stale epoch {epoch}: this node is registered under epoch {self.agent.epoch}")

    def _arrive(self, rid: str) -> None:
        if self.aborted.discard(rid):
            raise RpcError(grpc.StatusCode.ABORTED, f"request {rid} was aborted")
        if rid in self.reserved or rid in self.running:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already here")
        self.seen.add(rid)

    def _stream(self, prompt: list[int], sampling: api_pb2.SamplingParams, epoch: int, subscriber: str) -> Stream:
        if not prompt or len(prompt) + sampling.max_tokens > self.cfg.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} + {sampling.max_tokens} tokens exceeds "
                             f"max_model_len {self.cfg.max_model_len}")
        return Stream(prompt, _seed(prompt), sampling.max_tokens, frozenset(sampling.stop_token_ids), epoch, subscriber)

    # DecodeNode

    async def Reserve(self, req: node_pb2.ReserveRequest, context) -> node_pb2.Ticket:
        epoch = self._epoch(req.epoch)
        if len(self.reserved) + len(self.running) >= self.cfg.max_num_seqs:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"synthetic node full ({self.cfg.max_num_seqs})")
        stream = self._stream(list(req.prompt_token_ids), req.sampling, epoch, req.subscriber)
        if self.role == api_pb2.ROLE_DECODE:  # colocated: Prefill takes the request, Reserve holds nothing
            self._arrive(req.request_id)
            self.reserved[req.request_id] = stream
        elif self.aborted.discard(req.request_id):
            raise RpcError(grpc.StatusCode.ABORTED, f"request {req.request_id} was aborted")
        return node_pb2.Ticket(transfer_id=req.request_id, decode_node_id=self.agent.node_id, epoch=epoch,
                               kv_endpoint=self.kv_endpoint, lease_expiry=time.time() + (req.lease_s or 30.0),
                               decode_tp=1)

    async def Renew(self, req: node_pb2.RenewRequest, context) -> node_pb2.RenewResponse:
        self._epoch(req.epoch)
        return node_pb2.RenewResponse(missing=[r for r in req.request_ids if r not in self.reserved],
                                      lease_expiry=time.time() + (req.lease_s or 30.0))

    async def Subscribe(self, req: node_pb2.SubscribeRequest, context) -> None:
        sid = req.subscriber
        sub = Subscriber(epoch=req.epoch or self.agent.epoch, limit=self.cfg.max_unread_batches)
        self.subscribers[sub] = sid
        try:
            await sub.stream(context)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{sub.limit} token batches unread")
        finally:
            self.subscribers.pop(sub, None)  # a subscriber cut off by _publish is gone already
            if sid and sid not in self.subscribers.values():  # its requests have nobody to go to
                self._drop(lambda s: s.subscriber == sid)
            elif not sid and not any(s.epoch == sub.epoch for s, i in self.subscribers.items() if not i):
                self._drop(lambda s: s.epoch == sub.epoch and not s.subscriber)

    async def Abort(self, req: node_pb2.AbortRequest, context) -> node_pb2.AbortResponse:
        rid = req.request_id
        if self.reserved.pop(rid, None) is not None or self.running.pop(rid, None) is not None:
            return node_pb2.AbortResponse(found=True)
        if rid not in self.seen:  # it may be on its way: refuse it when it comes
            self.aborted.add(rid)
        return node_pb2.AbortResponse(found=False)

    def admit(self, rid: str) -> Stream:
        """The pair's KV "arrived": the reservation starts decoding at index 1."""
        stream = self.reserved.pop(rid, None)
        if stream is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {rid} is not reserved here")
        self._run(rid, stream)
        return stream

    # PrefillNode

    async def Prefill(self, req: node_pb2.PrefillRequest, context) -> node_pb2.PrefillResponse:
        start, rid, prompt = time.time(), req.request_id, list(req.prompt_token_ids)
        first = synthetic_token(prompt, 0, self.cfg.vocab_size)
        done = req.sampling.max_tokens <= 1 or first in req.sampling.stop_token_ids
        finish = (api_pb2.FINISH_REASON_LENGTH if req.sampling.max_tokens <= 1 else api_pb2.FINISH_REASON_STOP) \
            if done else 0
        resp = node_pb2.PrefillResponse(first_token=first, prefill_start=start, text=f"{first} ", finish_reason=finish)
        resp.prefill_end = resp.transfer_end = time.time()
        if req.keep_kv:  # colocated
            epoch = self._epoch(req.ticket.epoch)
            self._arrive(rid)
            if not done:
                self._run(rid, self._stream(prompt, req.sampling, epoch, req.subscriber))
        elif not done:
            decode = LOCAL.get(req.ticket.kv_endpoint)
            if decode is None:
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: no synthetic decode node at "
                                                            f"{req.ticket.kv_endpoint} in this process")
            decode.admit(rid)
        return resp

    # steps

    def _run(self, rid: str, stream: Stream) -> None:
        stream.next_index, stream.decode_start = 1, time.time()
        self.running[rid] = stream
        self.work.set()

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.cfg.step_period_s
        due = loop.time()
        while True:
            if not self.running:
                self.work.clear()
                await self.work.wait()
                due = loop.time()
            due += period
            wait = due - loop.time()
            if wait < -period:  # fell behind: no burst of steps to catch up
                due, wait = loop.time(), 0.0
            await asyncio.sleep(max(0.0, wait))
            self.step()

    def step(self) -> None:
        """One decode step: tokens for every running request, one batch per subscriber."""
        k, vocab, entries = self.cfg.tokens_per_step, self.cfg.vocab_size, []
        for rid, s in list(self.running.items()):
            n = min(k, s.max_tokens - s.next_index)
            tokens = [(s.seed + 7919 * (s.next_index + j)) % vocab for j in range(n)]
            finish = api_pb2.FINISH_REASON_LENGTH if s.next_index + n == s.max_tokens else 0
            for j, tok in enumerate(tokens):
                if tok in s.stop_ids:
                    tokens, finish = tokens[:j + 1], api_pb2.FINISH_REASON_STOP
                    break
            entries.append(Entry(rid, s.next_index, tokens, finish, s.decode_start if s.next_index == 1 else 0.0,
                                 s.subscriber))
            s.next_index += len(tokens)
            if finish:
                del self.running[rid]
        self.steps += 1
        if entries:
            self._publish(entries)

    def _publish(self, entries: list[Entry]) -> None:
        """A request with a subscriber id goes to that subscriber's streams only; "" to all."""
        routed = any(e.subscriber for e in entries)
        batches: dict[str, node_pb2.TokenBatch] = {}
        for sub, sid in list(self.subscribers.items()):
            key = sid if routed else ""
            if key not in batches:
                batches[key] = token_batch([e for e in entries if e.subscriber in ("", sid)] if routed else entries)
            if not sub.put(batches[key]):
                self.subscribers.pop(sub, None)

    def _drop(self, matches) -> None:
        """Forget every request `matches` picks (nobody is left to stream it to)."""
        gone = 0
        for table in (self.reserved, self.running):
            for rid in [r for r, s in table.items() if matches(s)]:
                del table[rid]
                gone += 1
        if gone:
            log.warning("dropped %d requests: their subscription or registration ended", gone)


def model_dir(cfg: SyntheticConfig) -> tuple[Path, bool]:
    """The folder reported as the model, and whether it was written here (a config.json
    only: the coordinator finds no tokenizer and takes token-id prompts)."""
    if cfg.model:
        return Path(cfg.model), False
    path = Path(tempfile.mkdtemp(prefix="pdserve-synthetic-"))
    (path / "config.json").write_text(json.dumps({"model_type": "synthetic", "vocab_size": cfg.vocab_size,
                                                  "max_position_embeddings": cfg.max_model_len}))
    return path, True


class SyntheticProcess:
    """The node(s) of one synthetic node process: one colocated node, or a decode node and
    the prefill node that "ships" its KV in memory."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.roles = [api_pb2.ROLE_BOTH] if cfg.role == "both" else [api_pb2.ROLE_DECODE, api_pb2.ROLE_PREFILL]
        self.nodes: list[SyntheticNode] = []
        self.folder, self.written = None, False

    async def start(self) -> str:
        self.folder, self.written = model_dir(self.cfg)
        for role in self.roles:
            node = SyntheticNode(self.cfg, role, self.folder)
            await node.start()
            self.nodes.append(node)
        return " ".join(n.address for n in self.nodes)

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()
        if self.written:
            shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pdserve.synthetic_node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, SyntheticConfig)
    cfg = from_args(SyntheticConfig, p.parse_args(argv))
    sys.exit(asyncio.run(run_until_signal(SyntheticProcess(cfg))))


if __name__ == "__main__":
    main()
