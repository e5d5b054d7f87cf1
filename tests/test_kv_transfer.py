"""KV data plane over ZeroMQ (kv_transfer/zmq, kv_transfer/base): real sockets on loopback, one process.

Every test ends with nothing registered on either side; closing leaves no thread."""
from __future__ import annotations

import threading
import time
import xxhash

import pytest
import torch
import zmq

from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.header import PROTOCOL_VERSION, build_header
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range, unique_ranks
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.zmq.manager import ZmqKVManager
from pdserve.v1 import kv_pb2

LAYERS, BLOCK, HEAD_DIM = 4, 4, 8
BLOCKS = [9, 2, 5]  # a reservation, in order


def layout(heads: int = 6, dtype: torch.dtype = torch.float32, model: str = "tiny") -> KVLayout:
    return KVLayout.create(model, LAYERS, heads, HEAD_DIM, BLOCK, dtype)


def full_kv(lay: KVLayout, seed: int = 0) -> torch.Tensor:
    """[layers, 2, blocks, block_size, heads, head_dim]: every head of a prompt's KV."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lay.num_layers, *lay.shard_shape(len(BLOCKS), lay.num_kv_heads), generator=g).to(lay.dtype)


def shards_of(kv: torch.Tensor, layer: int, tp: int) -> list[torch.Tensor]:
    """What each prefill rank's KVCache.export_layer returns for one layer."""
    heads = kv.shape[4]
    return [kv[layer][:, :, :, s:e].contiguous() for s, e in (kv_head_range(r, tp, heads) for r in range(tp))]


class Recorder:
    """A decode node's write(): keeps a copy of every layer it is given, in call order."""

    def __init__(self):
        self.calls: list[tuple[int, list[torch.Tensor]]] = []

    def __call__(self, layer: int, per_rank: list[torch.Tensor]) -> None:
        self.calls.append((layer, [t.clone() for t in per_rank]))

    @property
    def layers(self) -> list[int]:
        return [layer for layer, _ in self.calls]


def wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def pair():
    """(decode manager, prefill manager) on tcp loopback; asserts nothing is left registered."""
    made: list[ZmqKVManager] = []

    def make(lay: KVLayout, prefill_tp: int = 1, decode_tp: int = 1, **bind) -> tuple[ZmqKVManager, ZmqKVManager]:
        dec = ZmqKVManager(Role.DECODE, lay, tp=decode_tp, poll_interval_s=0.01, **bind)
        pre = ZmqKVManager(Role.PREFILL, lay, tp=prefill_tp, poll_interval_s=0.01)
        dec.start()
        pre.start()
        made.extend([dec, pre])
        return dec, pre

    yield make
    for m in made:
        assert wait_until(lambda: m.pending == 0, 2.0), f"{m.role.value} side left {m.pending} transfers registered"
        m.close()


def send_all(pre: ZmqKVManager, endpoint: str, kv: torch.Tensor, tid: str = "t", epoch: int = 1,
             first_token: int = 7, group: int = 2):
    tx = pre.sender(endpoint, tid, epoch, len(BLOCKS))
    for start in range(0, kv.shape[0], group):
        tx.send_layers(start, [shards_of(kv, layer, pre.tp) for layer in range(start, min(start + group, kv.shape[0]))])
    tx.finish(first_token)
    return tx


def test_kv_head_range_follows_the_engines_sharding():
    assert [kv_head_range(r, 3, 6) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    assert [kv_head_range(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated in pairs
    assert kv_head_range(0, 1, 3) == (0, 3)
    assert unique_ranks(4, 2) == [0, 2]
    with pytest.raises(ValueError):
        kv_head_range(0, 2, 3)


@pytest.mark.parametrize("heads,p,d,dtype", [
    (6, 1, 1, torch.float32), (6, 1, 2, torch.float32), (6, 2, 1, torch.bfloat16), (6, 1, 3, torch.float32),
    (6, 3, 1, torch.float32), (6, 2, 3, torch.bfloat16),
    (2, 1, 4, torch.float32),  # GQA: decode ranks share heads
    (2, 4, 2, torch.bfloat16),  # GQA: prefill ranks share heads, only one of each pair is sent
])
def test_round_trip_is_bit_exact_for_every_decode_rank(pair, heads, p, d, dtype):
    lay = layout(heads, dtype)
    dec, pre = pair(lay, prefill_tp=p, decode_tp=d)
    kv, written = full_kv(lay), Recorder()
    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
    tx = send_all(pre, dec.endpoint, kv)
    assert tx.wait(5) == TransferState.DONE, tx.error
    assert rx.wait(1) == TransferState.DONE and rx.first_token == 7
    assert written.layers == list(range(LAYERS))
    for layer, per_rank in written.calls:
        assert len(per_rank) == d
        for r, got in enumerate(per_rank):
            start, end = kv_head_range(r, d, heads)
            assert got.dtype == dtype and torch.equal(got, kv[layer][:, :, :, start:end])


def test_layers_stream_in_order_and_each_is_written_once(pair):
    lay = KVLayout.create("tiny", 7, 2, HEAD_DIM, BLOCK, torch.float32)
    dec, pre = pair(lay)
    kv, written = full_kv(lay), Recorder()
    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
    tx = pre.sender(dec.endpoint, "t", 1, len(BLOCKS))
    tx.send_layers(0, [shards_of(kv, 0, 1)])
    assert wait_until(lambda: written.layers == [0])  # written before the rest is even computed
    assert rx.state == TransferState.TRANSFERRING and tx.state == TransferState.TRANSFERRING
    tx.send_layers(1, [shards_of(kv, layer, 1) for layer in (1, 2, 3)])
    tx.send_layers(4, [shards_of(kv, layer, 1) for layer in (4, 5)])
    tx.send_layers(6, [shards_of(kv, 6, 1)])
    tx.finish(3)
    assert tx.wait(5) == TransferState.DONE and rx.wait(1) == TransferState.DONE
    assert written.layers == list(range(7))
    assert all(torch.equal(t[0], kv[layer]) for layer, t in written.calls)


def cut_last_frame(parts):
    return parts[:-1]


def cut_bytes(parts):
    return [*parts[:-1], parts[-1][:-16]]


def flip_a_byte(parts):
    frame = bytearray(parts[-1])
    frame[100] ^= 0x01
    return [*parts[:-1], bytes(frame)]


@pytest.mark.parametrize("damage,reason", [(cut_last_frame, "truncated"), (cut_bytes, "truncated"),
                                           (flip_a_byte, "checksum")])
def test_a_damaged_message_fails_both_sides_and_writes_nothing_of_it(pair, damage, reason):
    lay = layout()
    dec, pre = pair(lay)
    kv, written = full_kv(lay), Recorder()
    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
    tx = pre.sender(dec.endpoint, "t", 1, len(BLOCKS))
    tx.send_layers(0, [shards_of(kv, 0, 1)])  # arrives whole
    assert wait_until(lambda: written.layers == [0])
    build = tx.build_message
    tx.build_message = lambda out: damage(build(out)) if out.layer_start == 1 else build(out)  # on the wire
    tx.send_layers(1, [shards_of(kv, 1, 1), shards_of(kv, 2, 1)])
    tx.send_layers(3, [shards_of(kv, 3, 1)])  # whole, but after a failure: dropped
    tx.finish(0)
    assert tx.wait(5) == TransferState.FAILED and reason in tx.error
    assert rx.wait(1) == TransferState.FAILED and reason in rx.error
    assert written.layers == [0]


def raw_dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    return sock


def test_a_hand_made_message_missing_a_frame_is_refused_with_a_reason(pair):
    lay = layout()
    dec, _ = pair(lay)
    kv, written = full_kv(lay), Recorder()
    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
    frames = [memoryview(kv[layer].view(torch.uint8).reshape(-1).numpy()) for layer in (0, 1)]
    header = build_header(lay, "t", 1, len(BLOCKS), 0, 2, [(0, 0, 6)], frames)
    sock = raw_dealer(dec.endpoint)
    try:
        sock.send_multipart([header, frames[0]])  # the header announces two frames
        ack = kv_pb2.KVAck.FromString(sock.recv())
    finally:
        sock.close()
    assert (ack.transfer_id, ack.ok) == ("t", False) and "truncated: 1 frames" in ack.error
    assert rx.state == TransferState.FAILED and written.calls == []


def test_a_wrong_compat_hash_is_refused_before_anything_else_is_read(pair):
    dec, _ = pair(layout())
    header = kv_pb2.KVHeader(protocol_version=PROTOCOL_VERSION, compat_hash="not-ours", transfer_id="nobody",
                             epoch=99, num_layers=5, frame_bytes=[1]).SerializeToString()
    bad_version = kv_pb2.KVHeader(protocol_version=PROTOCOL_VERSION + 1, compat_hash=layout().compat_hash,
                                  transfer_id="nobody").SerializeToString()
    sock = raw_dealer(dec.endpoint)
    try:
        sock.send_multipart([header, b"garbage"])
        first = kv_pb2.KVAck.FromString(sock.recv())
        sock.send_multipart([bad_version])
        second = kv_pb2.KVAck.FromString(sock.recv())
        sock.send_multipart([b"\xff\xff not a header"])
        third = kv_pb2.KVAck.FromString(sock.recv())
    finally:
        sock.close()
    assert not first.ok and first.error.startswith("compat_hash mismatch")  # not "unknown transfer"
    assert not second.ok and second.error.startswith("protocol version")
    assert not third.ok and third.error.startswith("bad header")


def test_a_sender_of_another_model_is_refused(pair):
    dec, _ = pair(layout(model="tiny"))
    other = ZmqKVManager(Role.PREFILL, layout(model="other"), poll_interval_s=0.01)
    other.start()
    try:
        written = Recorder()
        rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
        tx = send_all(other, dec.endpoint, full_kv(layout()))
        assert tx.wait(5) == TransferState.FAILED and "compat_hash mismatch" in tx.error
        assert written.calls == [] and rx.state == TransferState.WAITING
        assert dec.cancel("t") and rx.state == TransferState.FAILED and rx.error == "cancelled"
    finally:
        other.close()


def test_a_stale_epoch_is_refused_and_the_expectation_waits_for_the_current_one(pair):
    lay = layout()
    dec, frozen = pair(lay)
    _, current_node = pair(lay)
    kv, written = full_kv(lay), Recorder()
    rx = dec.expect("t", 5, BLOCKS, time.time() + 30, written)
    stale = send_all(frozen, dec.endpoint, kv, epoch=4)  # a node that woke up after the request moved
    assert stale.wait(5) == TransferState.FAILED and "stale epoch 4, expected 5" in stale.error
    assert written.calls == [] and rx.state == TransferState.WAITING
    current = send_all(current_node, dec.endpoint, kv, epoch=5)
    assert current.wait(5) == TransferState.DONE and rx.wait(1) == TransferState.DONE
    assert written.layers == list(range(LAYERS))


def test_an_expired_lease_fails_the_receiver_and_refuses_the_sender(pair):
    lay = layout()
    dec, pre = pair(lay)
    written = Recorder()
    rx = dec.expect("t", 1, BLOCKS, time.time() + 0.1, written)
    assert rx.wait(2) == TransferState.FAILED and rx.error == "lease expired"  # the owner frees its blocks now
    assert dec.pending == 0
    tx = send_all(pre, dec.endpoint, full_kv(lay))
    assert tx.wait(5) == TransferState.FAILED and "lease expired" in tx.error
    assert written.calls == []


def test_an_unknown_transfer_and_a_cancelled_one_are_refused(pair):
    lay = layout()
    dec, pre = pair(lay)
    unknown = send_all(pre, dec.endpoint, full_kv(lay), tid="who")
    assert unknown.wait(5) == TransferState.FAILED and "unknown transfer 'who'" in unknown.error
    written = Recorder()
    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
    assert dec.cancel("t") and not dec.cancel("t")
    cancelled = send_all(pre, dec.endpoint, full_kv(lay))
    assert cancelled.wait(5) == TransferState.FAILED and "cancelled" in cancelled.error
    assert rx.state == TransferState.FAILED and written.calls == []


def test_a_failing_write_fails_the_transfer(pair):
    lay = layout()
    dec, pre = pair(lay)

    def write(layer: int, per_rank: list[torch.Tensor]) -> None:
        raise MemoryError("pool gone")

    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, write)
    tx = send_all(pre, dec.endpoint, full_kv(lay))
    assert tx.wait(5) == TransferState.FAILED and "write failed at layer 0: MemoryError" in tx.error
    assert rx.state == TransferState.FAILED


def test_a_sender_without_a_receiver_times_out_and_its_socket_is_dropped(pair):
    lay = layout()
    dec, pre = pair(lay)
    with zmq.Context.instance().socket(zmq.ROUTER) as probe:  # a free port nobody listens on
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    dead = f"tcp://127.0.0.1:{port}"
    tx = send_all(pre, dead, full_kv(lay))
    t0 = time.monotonic()
    assert tx.wait(0.3) == TransferState.FAILED and "no ack" in tx.error
    assert time.monotonic() - t0 < 1.0
    assert wait_until(lambda: pre.connections == [])  # queued frames dropped, no endless reconnects
    rx = dec.expect("t", 1, BLOCKS, time.time() + 30, Recorder())  # a live endpoint still works
    assert send_all(pre, dec.endpoint, full_kv(lay)).wait(5) == TransferState.DONE
    assert rx.state == TransferState.DONE and pre.connections == [dec.endpoint]


def test_ipc_endpoints_work_too(tmp_path):
    lay, path = layout(), tmp_path / "kv.sock"
    dec = ZmqKVManager(Role.DECODE, lay, tp=3, ipc_path=str(path), poll_interval_s=0.01)
    pre = ZmqKVManager(Role.PREFILL, lay, tp=2, poll_interval_s=0.01)
    dec.start()
    pre.start()
    try:
        assert dec.endpoint == f"ipc://{path}"
        kv, written = full_kv(lay), Recorder()
        rx = dec.expect("t", 1, BLOCKS, time.time() + 30, written)
        tx = send_all(pre, dec.endpoint, kv)
        assert tx.wait(5) == TransferState.DONE and rx.wait(1) == TransferState.DONE
        assert torch.equal(written.calls[-1][1][2], kv[LAYERS - 1][:, :, :, 4:6])
        assert wait_until(lambda: dec.pending == 0 and pre.pending == 0)
    finally:
        pre.close()
        dec.close()
    assert not path.exists()


def test_close_joins_every_thread_and_fails_what_was_in_flight():
    def ours() -> list[threading.Thread]:  # pyzmq's own zero-copy collector is process-wide, not ours
        return [t for t in threading.enumerate() if t.name.startswith("pdserve-kv")]

    before = set(threading.enumerate())
    lay = KVLayout.create("big", 2, 2, 64, 16, torch.float32)  # 64 KiB+ frames: zero-copy sends
    dec = ZmqKVManager(Role.DECODE, lay, poll_interval_s=0.01, recv_writers=2)
    pre = ZmqKVManager(Role.PREFILL, lay, poll_interval_s=0.01)
    dec.start()
    pre.start()
    assert len(ours()) == 2 + 2  # receive, send, and the receiver's writers
    kv = torch.randn(2, *lay.shard_shape(64, 2))
    written = Recorder()
    done = dec.expect("a", 1, list(range(64)), time.time() + 30, written)
    tx = pre.sender(dec.endpoint, "a", 1, 64)
    tx.send_layers(0, [[kv[0]], [kv[1]]])
    tx.finish(1)
    assert tx.wait(5) == TransferState.DONE and done.state == TransferState.DONE
    waiting = dec.expect("b", 1, [0], time.time() + 30, written)
    stuck = pre.sender("tcp://127.0.0.1:9", "c", 1, 64)
    stuck.send_layers(0, [[kv[0]]])
    pre.close()
    dec.close()
    assert ours() == []
    leftover = [t for t in set(threading.enumerate()) - before if "Garbage" not in type(t).__name__]
    assert leftover == []
    assert waiting.state == TransferState.FAILED and waiting.error == "KV manager closed"
    assert stuck.state == TransferState.FAILED and stuck.error == "KV manager closed"
    assert dec.pending == 0 and pre.pending == 0


def test_frames_carry_xxh3_checksums_and_sizes():
    lay = layout()
    frame = memoryview(torch.arange(12, dtype=torch.float32).view(torch.uint8).numpy())
    header = kv_pb2.KVHeader.FromString(build_header(lay, "t", 3, 1, 0, 1, [(0, 0, 6)], [frame], last=True))
    assert list(header.frame_xxh3) == [xxhash.xxh3_64_intdigest(frame)] and list(header.frame_bytes) == [48]
    assert (header.compat_hash, header.epoch, header.dtype, header.last) == (lay.compat_hash, 3, "float32", True)
