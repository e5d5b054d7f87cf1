"""The ZeroMQ backend streams a prompt's KV from its step at any prefill TP size
(kv_transfer/zmq/connector.py): a real engine with the backend's connector worker on every
rank (TP 2: a second rank process, gathers over gloo), real sockets on loopback."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from pdserve.common.config import EngineConfig
from pdserve.common.sampling import SamplingParams
from pdserve.engine.llm_engine import LLMEngine
from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.zmq import streams
from pdserve.kv_transfer.zmq.backend import BACKEND
from pdserve.kv_transfer.zmq.config import ZmqConfig
from pdserve.kv_transfer.zmq.manager import ZmqKVManager


@pytest.mark.parametrize("family, p_tp, d_tp", [("qwen2", 1, 1), ("qwen2", 2, 1), ("llama", 2, 2), ("qwen2", 1, 2)])
def test_layer_0_reaches_the_receiver_before_the_last_layer_is_computed(tiny_models, family, p_tp, d_tp):
    """llama has one KV head: at TP 2 both ranks hold it, and only rank 0's copy is sent."""
    cfg = EngineConfig(model=tiny_models[family], kv_blocks=64, block_size=4, tp=p_tp)
    with LLMEngine(cfg, BACKEND.connector(ZmqConfig())) as engine:
        runner = engine.executor.runner
        lay = KVLayout.create(family, engine.spec.num_layers, engine.spec.num_kv_heads, engine.spec.head_dim,
                              cfg.block_size, runner.dtype)
        dec = ZmqKVManager(Role.DECODE, lay, tp=d_tp, poll_interval_s=0.01)
        pre = ZmqKVManager(Role.PREFILL, lay, tp=p_tp, poll_interval_s=0.01)
        dec.start()
        pre.start()
        engine.on_kv_save = pre.on_save_start
        received: list[tuple[int, torch.Tensor]] = []
        layer_0_in = threading.Event()

        def write(layer: int, per_rank: list[torch.Tensor]) -> None:
            received.append((layer, torch.cat(per_rank, dim=3) if d_tp == 1 or lay.num_kv_heads > 1
                             else per_rank[0].clone()))
            if d_tp > 1 and lay.num_kv_heads == 1:
                assert torch.equal(per_rank[0], per_rank[1])  # replicated: each decode rank gets the head
            layer_0_in.set()

        # the last layer's forward waits (on the engine thread) until the receiver wrote layer 0
        seen_before_last: list[bool] = []
        hook = runner.model.layers[-1].register_forward_pre_hook(
            lambda *_: seen_before_last.append(layer_0_in.wait(30)))
        try:
            prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
            n_blocks = -(-len(prompt) // cfg.block_size)
            rx = dec.expect("t", 1, list(range(n_blocks)), time.time() + 60, write)
            tx = pre.sender(dec.endpoint, "t", 1, n_blocks, stream=True)
            seq = engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0.0), prefill_only=True,
                                     kv_save=tx.save)
            (out,) = engine.step()
            tx.complete(out.token_id, lambda start, n: engine.export_kv(seq, start, n))
            assert tx.wait(10) == TransferState.DONE and rx.wait(10) == TransferState.DONE, (tx.error, rx.error)
            expected = engine.export_kv(seq)
            engine.release(seq)
            assert not pre.poll(engine)   # the worker reported the save's end
        finally:
            hook.remove()
            pre.close()
            dec.close()
    assert seen_before_last == [True]
    assert rx.first_token == out.token_id
    assert [layer for layer, _ in received] == list(range(lay.num_layers))
    for layer, kv in received:  # every KV head once, whatever the TP sizes
        want = expected[layer][0] if lay.num_kv_heads == 1 else torch.cat(expected[layer], dim=3)
        assert torch.equal(kv, want)
    assert streams.offered() == 0


@pytest.mark.parametrize("p_tp", [1, 2])
def test_a_sender_withdrawn_before_its_step_leaves_the_ranks_in_step(tiny_models, p_tp):
    """Rank 0 has nothing to send to, yet at TP 2 every rank still runs the layer gathers:
    the step ends, the next prompt streams as usual, and the ranks report the first save ended."""
    cfg = EngineConfig(model=tiny_models["qwen2"], kv_blocks=64, block_size=4, tp=p_tp)
    with LLMEngine(cfg, BACKEND.connector(ZmqConfig())) as engine:
        lay = KVLayout.create("qwen2", engine.spec.num_layers, engine.spec.num_kv_heads, engine.spec.head_dim,
                              cfg.block_size, engine.executor.runner.dtype)
        dec = ZmqKVManager(Role.DECODE, lay, poll_interval_s=0.01)
        pre = ZmqKVManager(Role.PREFILL, lay, tp=p_tp, poll_interval_s=0.01)
        dec.start()
        pre.start()
        engine.on_kv_save = pre.on_save_start
        try:
            prompt, params = [3, 1, 4, 1, 5], SamplingParams(max_tokens=4, temperature=0.0)
            gone = pre.sender(dec.endpoint, "gone", 1, 2, stream=True)
            seq = engine.add_request(prompt, params, prefill_only=True, kv_save=gone.save)
            gone.withdraw("aborted")
            engine.step()
            engine.release(seq)
            assert not pre.poll(engine) and gone.state == TransferState.FAILED

            written = []
            rx = dec.expect("next", 1, [0, 1], time.time() + 60, lambda layer, _: written.append(layer))
            tx = pre.sender(dec.endpoint, "next", 1, 2, stream=True)
            seq = engine.add_request(prompt, params, prefill_only=True, kv_save=tx.save)
            (out,) = engine.step()
            tx.complete(out.token_id, lambda start, n: engine.export_kv(seq, start, n))
            assert tx.wait(10) == TransferState.DONE and rx.wait(10) == TransferState.DONE
            engine.release(seq)
            assert written == list(range(lay.num_layers))
            assert not pre.poll(engine)
        finally:
            pre.close()
            dec.close()
    assert streams.offered() == 0
