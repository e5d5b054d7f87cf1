"""The NCCL transport's node-side rules without processes: which pairs move which
heads, and when a sender or receiver may end (the receiver never before its posted
receives ended, since they write into its blocks)."""
from __future__ import annotations

import time

import pytest
import torch

from pdserve.engine.kv_connector import KVRoute
from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.nccl.pairs import PairSet
from pdserve.kv_transfer.nccl.receiver import NcclKVReceiver
from pdserve.kv_transfer.nccl.sender import NcclKVSender
from pdserve.v1 import kv_pb2

LAYOUT = KVLayout.create("m", 2, 2, 8, 4, torch.float32)


@pytest.mark.parametrize("heads, p_tp, d_tp", [(8, 1, 1), (8, 1, 2), (8, 2, 1), (8, 2, 4), (8, 4, 2), (1, 1, 2),
                                               (2, 4, 1), (2, 1, 4), (4, 4, 4)])
def test_every_decode_rank_gets_each_of_its_heads_from_exactly_one_prefill_rank(heads, p_tp, d_tp):
    ps = PairSet("n.1", heads, p_tp, d_tp)
    got = {s: [] for s in range(d_tp)}
    for r, s, lo, n in ps.slices:
        a, b = kv_head_range(r, p_tp, heads)
        assert a <= lo and lo + n <= b, "a prefill rank sends only heads it holds"
        got[s].extend(range(lo, lo + n))
    for s in range(d_tp):
        c, d = kv_head_range(s, d_tp, heads)
        assert sorted(got[s]) == list(range(c, d))
    dests, srcs = ps.dests(), ps.srcs()
    for r, s, lo, n in ps.slices:  # local offsets: the same global heads on both ends
        assert KVRoute(r, ps.pair(r, s), lo - kv_head_range(r, p_tp, heads)[0], n) in dests
        assert KVRoute(s, ps.pair(r, s), lo - kv_head_range(s, d_tp, heads)[0], n) in srcs
    spec = ps.channels(Role.PREFILL, "127.0.0.1", 1)
    assert [(e.name, e.side) for e in spec] == [(ps.pair(r, s), 0) for r, s, _, _ in ps.slices]
    assert list(spec) == sorted(spec, key=lambda e: e.name), "pairs open in one order on both sides"


class Manager:
    """The callables a receiver or sender gets from NcclKVManager."""
    layout = LAYOUT

    def __init__(self):
        self.pair_sets = {"p.1": PairSet("p.1", 2, 1, 1)}
        self.posted, self.retired, self.submitted = [], [], []

    def post_recv(self, rx, ps):
        self.posted.append(rx.transfer_id)

    def retire(self, rx):
        self.retired.append(rx.transfer_id)

    def submit(self, tx, out):
        self.submitted.append(out)


def header(tid: str, **kw) -> kv_pb2.KVHeader:
    h = kv_pb2.KVHeader(protocol_version=PROTOCOL_VERSION, compat_hash=LAYOUT.compat_hash, transfer_id=tid, epoch=1,
                        total_layers=2, num_blocks=3, block_size=4, head_dim=8, dtype="float32", pair_set="p.1")
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def announce(tid: str) -> kv_pb2.KVHeader:
    h = header(tid, layer_start=0, num_layers=2)
    h.shards.add(tp_rank=0, head_start=0, num_heads=2)
    return h


def receiver(m: Manager, tid: str = "t", lease_s: float = 30.0) -> NcclKVReceiver:
    return NcclKVReceiver(LAYOUT, tid, 1, [4, 5, 6], time.time() + lease_s, 1, m.pair_sets.get, m.post_recv, m.retire)


def sender(m: Manager) -> NcclKVSender:
    return NcclKVSender(LAYOUT, m.pair_sets["p.1"], "t", 1, 3, m.submit)


@pytest.mark.parametrize("data_first", [True, False])
def test_a_receiver_is_done_once_its_data_is_verified_and_the_first_token_came(data_first):
    m = Manager()
    rx = receiver(m)
    assert rx.accept(announce("t"), []) == "" and m.posted == ["t"]
    steps = [lambda: rx.on_data(True, ""), lambda: rx.accept(header("t", layer_start=2, last=True, first_token=7), [])]
    for step in steps if data_first else steps[::-1]:
        assert rx.state == TransferState.TRANSFERRING
        step()
    assert rx.state == TransferState.DONE and rx.first_token == 7 and m.retired == ["t"]


def test_a_failure_while_receives_are_posted_waits_for_them_to_end():
    m = Manager()
    rx = receiver(m)
    rx.accept(announce("t"), [])
    assert rx.fail("lease expired")
    assert rx.state == TransferState.TRANSFERRING, "the posted receives may still write the blocks"
    rx.on_data(True, "")
    assert rx.state == TransferState.FAILED and rx.error == "lease expired"


def test_a_failed_receive_fails_the_transfer():
    m = Manager()
    rx = receiver(m)
    rx.accept(announce("t"), [])
    rx.on_data(False, "checksum mismatch in layer 1")
    assert rx.state == TransferState.FAILED and "checksum mismatch" in rx.error


def test_cancelled_before_the_announce_then_withdrawn_ends_without_posting():
    m = Manager()
    rx = receiver(m)
    assert rx.cancel()
    assert not rx.status.ended, "the sends may already be issued: wait for the announce or the withdrawal"
    rx.accept(header("t", layer_start=0, last=True, withdrawn=True), [])
    assert rx.state == TransferState.FAILED and rx.error == "cancelled" and m.posted == []


def test_cancelled_before_the_announce_still_drains_the_data_and_never_admits():
    m = Manager()
    rx = receiver(m)
    rx.cancel()
    assert rx.accept(announce("t"), []) == "" and m.posted == ["t"], "the data is received so the pair stays in step"
    rx.accept(header("t", layer_start=2, last=True, first_token=7), [])
    rx.on_data(True, "")
    assert rx.state == TransferState.FAILED and rx.error == "cancelled"


def test_cancelled_before_the_announce_ends_with_the_lease():
    m = Manager()
    rx = receiver(m, lease_s=0.0)
    rx.cancel()
    assert rx.state == TransferState.FAILED


def test_bad_announces_are_refused():
    m = Manager()
    bad = announce("a")
    bad.pair_set = "nope"
    assert "unknown pair set" in receiver(m, "a").accept(bad, [])
    bad = announce("b")
    bad.num_blocks = 9
    assert "blocks" in receiver(m, "b").accept(bad, [])
    assert "finish before announce" in receiver(m, "c").accept(header("c", last=True, first_token=1), [])


def test_a_sender_ends_only_when_its_sends_completed_and_its_finish_was_taken():
    m = Manager()
    tx = sender(m)
    tx.announce()
    tx.finish(7)
    tx.on_data(True, "")
    assert tx.state == TransferState.TRANSFERRING, "the finish is still queued"
    msg = kv_pb2.KVHeader.FromString(tx.build_message(m.submitted[-1])[0])
    assert msg.last and msg.first_token == 7 and not msg.withdrawn
    assert tx.state == TransferState.DONE
    first = kv_pb2.KVHeader.FromString(tx.build_message(m.submitted[0])[0])
    assert (first.layer_start, first.num_layers, first.pair_set) == (0, 2, "p.1")
    assert [(s.tp_rank, s.head_start, s.num_heads) for s in first.shards] == [(0, 0, 2)]


def test_a_withdrawn_sender_tells_the_receiver_and_fails():
    m = Manager()
    tx = sender(m)
    tx.withdraw()
    msg = kv_pb2.KVHeader.FromString(tx.build_message(m.submitted[-1])[0])
    assert msg.withdrawn and msg.last
    assert tx.state == TransferState.FAILED
