"""The ZeroMQ KV path under load (issue 21): many transfers in flight into one decode
engine at once, each written into its reserved blocks from the receive thread
(LLMEngine.write_kv) without waiting for an engine step. A real engine on its own
thread (TP 2: a second rank process), real sockets on loopback, one test process."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.common.sampling import SamplingParams
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.llm_engine import LLMEngine
from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.zmq.manager import ZmqKVManager

CONCURRENT = 64
PROMPT = 14   # tokens: 4 blocks of 4


class Gate:
    """A forward hook on the decode engine that holds a step while closed."""

    def __init__(self):
        self.open, self.held = threading.Event(), threading.Event()
        self.open.set()

    def __call__(self, *_):
        if not self.open.is_set():
            self.held.set()
            assert self.open.wait(60), "the gate was never opened"


@pytest.fixture(params=[(1, 0), (2, 0), (1, 4)], ids=["decode-tp1", "decode-tp2", "decode-tp1-writers4"])
def decode(request, tiny_models):
    """(engine, loop, decode manager, prefill manager, gate): a decode engine that always has
    a sequence running, so it keeps stepping; the gate can hold it inside a step. The receiver
    writes on its receive thread (the default) or on a pool of writer threads."""
    tp, writers = request.param
    cfg = EngineConfig(model=tiny_models["qwen2"], kv_blocks=CONCURRENT * 5 + 64, block_size=4, tp=tp)
    engine = LLMEngine(cfg).start()
    gate = Gate()
    engine.executor.runner.model.layers[0].register_forward_pre_hook(gate)
    loop = EngineLoop(engine, lambda outs: None, lambda e: None)
    loop.start()
    spec = engine.spec
    lay = KVLayout.create("qwen2", spec.num_layers, spec.num_kv_heads, spec.head_dim, cfg.block_size,
                          engine.executor.runner.dtype)
    dec = ZmqKVManager(Role.DECODE, lay, tp=tp, poll_interval_s=0.01, recv_writers=writers)
    pre = ZmqKVManager(Role.PREFILL, lay, tp=1, poll_interval_s=0.01)
    dec.start()
    pre.start()
    try:
        yield engine, loop, dec, pre, gate
    finally:
        gate.open.set()
        pre.close()
        dec.close()
        loop.close()
        engine.close()


def prompt_kv(lay: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """[layers, 2, blocks, block_size, heads, head_dim]: a prompt's KV, every head."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lay.num_layers, *lay.shard_shape(num_blocks, lay.num_kv_heads), generator=g).to(lay.dtype)


def test_64_concurrent_transfers_land_while_the_engine_is_held_in_a_step(decode):
    """Every transfer completes (checksums verified, layers written in order) while the engine
    thread sits inside one step: none waits for the engine, nor for another transfer. Once the
    step ends, each reservation holds exactly what was sent, on every rank; stale epochs and
    expired leases mixed in are still refused; every block comes back."""
    engine, loop, dec, pre, gate = decode
    lay, tp = dec.layout, dec.tp
    call = lambda fn: loop.call(fn).result(30)  # noqa: E731
    baseline = call(lambda e: e.blocks.num_free)
    nb = -(-PROMPT // 4)
    runner_up = call(lambda e: e.add_request([1, 2, 3], SamplingParams(max_tokens=400, temperature=0.0,
                                                                        ignore_eos=True)))
    gate.open.clear()
    assert gate.held.wait(30), "the engine never stepped"

    # reservations are made before the gate closes in a node; here the engine is held, so they are
    # taken straight from its block manager (thread-safe enough: the engine thread is parked in the hook)
    blocks = [engine.reserve(PROMPT) for _ in range(CONCURRENT + 2)]
    order: dict[str, list[int]] = defaultdict(list)

    def writer(tid: str, ids: list[int]):
        def write(layer: int, per_rank: list[torch.Tensor]) -> None:
            order[tid].append(layer)
            engine.write_kv(ids, layer, [per_rank])
        return write

    expiry = time.time() + 60
    rxs = [dec.expect(f"t{i}", 1, blocks[i], expiry, writer(f"t{i}", blocks[i])) for i in range(CONCURRENT)]
    stale_rx = dec.expect("stale", 2, blocks[-2], expiry, writer("stale", blocks[-2]))
    expired_rx = dec.expect("expired", 1, blocks[-1], time.time() + 0.05, writer("expired", blocks[-1]))
    assert expired_rx.wait(5) == TransferState.FAILED and expired_rx.error == "lease expired"

    kvs = [prompt_kv(lay, nb, i) for i in range(CONCURRENT)]
    txs = [pre.sender(dec.endpoint, f"t{i}", 1, nb) for i in range(CONCURRENT)]
    for layer in range(lay.num_layers):  # every transfer's layer l before any layer l + 1: all in flight
        for tx, kv in zip(txs, kvs):
            tx.send_layers(layer, [[kv[layer]]])
    for i, tx in enumerate(txs):
        tx.finish(100 + i)
    stale = pre.sender(dec.endpoint, "stale", 1, nb)
    expired = pre.sender(dec.endpoint, "expired", 1, nb)
    for tx in (stale, expired):
        for layer in range(lay.num_layers):
            tx.send_layers(layer, [[kvs[0][layer]]])
        tx.finish(0)

    states = [rx.wait(30) for rx in rxs]
    assert states == [TransferState.DONE] * CONCURRENT, [rx.error for rx in rxs if rx.error][:3]
    assert gate.held.is_set() and not gate.open.is_set()  # all of it while the engine sat in its step
    assert [tx.wait(10) for tx in txs] == [TransferState.DONE] * CONCURRENT
    assert [rx.first_token for rx in rxs] == [100 + i for i in range(CONCURRENT)]
    assert stale.wait(10) == TransferState.FAILED and "stale epoch 1, expected 2" in stale.error
    assert expired.wait(10) == TransferState.FAILED and "lease expired" in expired.error
    assert stale_rx.state == TransferState.WAITING and "stale" not in order and "expired" not in order
    dec.cancel("stale")
    assert all(order[f"t{i}"] == list(range(lay.num_layers)) for i in range(CONCURRENT))
    gate.open.set()

    def read_back(e):
        e.imports.flush()  # what admission does first
        return [e.executor.export_kv(0, lay.num_layers, ids) for ids in blocks[:CONCURRENT]]
    for i, layers in enumerate(call(read_back)):
        for layer, shards in enumerate(layers):
            assert len(shards) == tp
            for r, got in enumerate(shards):
                start, end = kv_head_range(r, tp, lay.num_kv_heads)
                assert torch.equal(got, kvs[i][layer][:, :, :, start:end]), f"transfer {i} layer {layer} rank {r}"

    def finish(e):
        for ids in blocks:
            e.release(ids)
        e.abort(runner_up)
    call(finish)
    assert call(lambda e: e.blocks.num_free) == baseline
    assert engine.imports.queued == 0
    assert dec.pending == 0 and pre.pending == 0


def test_transfers_complete_while_every_engine_step_is_slow(decode):
    """A slow step (a hook that sleeps) delays no transfer behind another: 64 transfers all
    complete, and admitted through the engine loop they decode like any sequence."""
    engine, loop, dec, pre, gate = decode
    lay = dec.layout
    call = lambda fn: loop.call(fn).result(60)  # noqa: E731
    baseline = call(lambda e: e.blocks.num_free)
    slow = engine.executor.runner.model.layers[-1].register_forward_hook(lambda *_: time.sleep(0.05))
    try:
        runner_up = call(lambda e: e.add_request([1, 2, 3], SamplingParams(max_tokens=400, temperature=0.0,
                                                                            ignore_eos=True)))
        nb = -(-PROMPT // 4)
        blocks = [call(lambda e: e.reserve(PROMPT + 4)) for _ in range(CONCURRENT)]
        rxs = [dec.expect(f"s{i}", 1, ids[:nb], time.time() + 60,  # the prompt's blocks; one more to grow into
                          lambda layer, per_rank, ids=ids: engine.write_kv(ids[:nb], layer, [per_rank]))
               for i, ids in enumerate(blocks)]
        kv = prompt_kv(lay, nb, 7)
        txs = [pre.sender(dec.endpoint, f"s{i}", 1, nb) for i in range(CONCURRENT)]
        for tx in txs:
            tx.send_layers(0, [[kv[layer]] for layer in range(lay.num_layers)])
            tx.finish(5)
        assert [rx.wait(30) for rx in rxs] == [TransferState.DONE] * CONCURRENT, [rx.error for rx in rxs][:2]
        assert [tx.wait(10) for tx in txs] == [TransferState.DONE] * CONCURRENT
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        outs = [call(lambda e, ids=ids: e.add_prefilled(list(range(PROMPT)), 5, params, ids)) for ids in blocks]
        deadline = time.monotonic() + 60
        while not all(o.seq.is_finished for o in outs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(len(o.seq.output_token_ids) == 3 for o in outs)
        call(lambda e: e.abort(runner_up))
    finally:
        slow.remove()
    assert call(lambda e: e.blocks.num_free) == baseline
