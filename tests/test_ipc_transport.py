"""The cuda-ipc transport's rules without processes: the copy layer over shared CPU
tensors (block runs, head re-slicing between TP sizes, checksums), the decode side's
grant (epoch, lease, pair set) and when a receiver may end (never while a granted
prefill node may still write), and when a sender sends its finish or withdrawal."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdserve.kv_transfer.base.conn import Outgoing
from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.cuda_ipc.copier import Copier, Peer, Route, block_runs
from pdserve.kv_transfer.cuda_ipc.receiver import IpcInbox, IpcKVReceiver
from pdserve.kv_transfer.cuda_ipc.sender import IpcKVSender
from pdserve.kv_transfer.nccl.pairs import PairSet
from pdserve.kv_transfer.registry import auto_choice, resolve
from pdserve.v1 import kv_pb2

LAYOUT = KVLayout.create("m", 2, 2, 8, 4, torch.float32)


def test_block_runs_pair_consecutive_blocks_on_both_sides():
    assert block_runs([3, 4, 5, 9], [10, 11, 12, 13]) == [(3, 10, 3), (9, 13, 1)]
    assert block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    with pytest.raises(ValueError):
        block_runs([1], [1, 2])


@pytest.mark.parametrize("heads, p_tp, d_tp", [(4, 1, 1), (4, 1, 2), (4, 2, 1), (4, 2, 4), (2, 4, 1), (1, 1, 2)])
@pytest.mark.parametrize("max_runs", [32, 1])   # copies per run, or one gather/scatter per layer
def test_each_decode_rank_gets_its_heads_into_its_reserved_blocks(heads, p_tp, d_tp, max_runs):
    layers, blocks, bs, dim = 3, 12, 4, 8
    full = torch.randn(layers, blocks, bs, heads, dim), torch.randn(layers, blocks, bs, heads, dim)
    src_ids, dst_ids = [1, 2, 3, 7], [4, 5, 9, 0]
    prefill = [[t[:, :, :, slice(*kv_head_range(r, p_tp, heads))].contiguous() for t in full] for r in range(p_tp)]
    decode = [[torch.zeros(layers, blocks, bs, kv_head_range(s, d_tp, heads)[1] - kv_head_range(s, d_tp, heads)[0],
                           dim) for _ in range(2)] for s in range(d_tp)]
    ps = PairSet("p.1", heads, p_tp, d_tp)
    for r in range(p_tp):  # what each prefill rank's connector does with its routes
        copier = Copier(*prefill[r], max_runs=max_runs)
        routes = []
        for route in [x for x in ps.dests() if x.rank == r]:
            s = int(route.channel.rsplit("-", 1)[1])
            lo = kv_head_range(r, p_tp, heads)[0] + route.head
            dst_head = lo - kv_head_range(s, d_tp, heads)[0]   # what the decode manager publishes
            routes.append(Route(Peer(route.channel, *decode[s], dst_head), route.head, route.heads))
        job = copier.job(1, routes, src_ids, dst_ids)
        assert (job.runs is None) == (max_runs == 1)
        if r % 2:  # one rank layer by layer (eager hooks), the other all layers at once (a replayed graph)
            for layer in range(layers):
                copier.copy_layer(job, layer)
        else:
            copier.copy_layers(job, 0, layers)
        assert copier.check(job) == ""
    for s in range(d_tp):
        a, b = kv_head_range(s, d_tp, heads)
        for got, want in zip(decode[s], full):
            assert torch.equal(got[:, dst_ids], want[:, src_ids][:, :, :, a:b])
            others = [i for i in range(blocks) if i not in dst_ids]
            assert not got[:, others].any(), "nothing outside the reserved blocks is written"


def test_a_corrupted_copy_is_caught_by_the_checksums():
    k, v = torch.randn(2, 4, 4, 2, 8), torch.randn(2, 4, 4, 2, 8)
    peer = Peer("p.1/0-0", torch.zeros_like(k), torch.zeros_like(v), 0)
    copier = Copier(k, v)
    job = copier.job(7, [Route(peer, 0, 2)], [0, 1], [2, 3], corrupt=True)
    for layer in range(2):
        copier.copy_layer(job, layer)
    assert copier.check(job) == "checksum mismatch (k, pair p.1/0-0)"
    with pytest.raises(ValueError, match="past the peer pool"):
        copier.job(8, [Route(peer, 0, 2)], [0], [4])


def test_the_fused_copy_kernel_in_triton_interpreter():
    """The GPU copy kernel (tests/gpu/test_gpu_ipc_kernels.py), run on CPU by Triton's
    interpreter: its indexing, head offsets and checksums are checked in CI too."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/gpu/test_gpu_ipc_kernels.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


# the decode side: grants

class Ends:
    def __init__(self):
        self.ended = []

    def __call__(self, rx):
        self.ended.append(rx.transfer_id)


def header(tid: str, epoch: int = 1, **kw) -> kv_pb2.KVHeader:
    h = kv_pb2.KVHeader(protocol_version=PROTOCOL_VERSION, compat_hash=LAYOUT.compat_hash, transfer_id=tid,
                        epoch=epoch, total_layers=2, num_blocks=3, block_size=4, head_dim=8, dtype="float32",
                        pair_set="p.1")
    for k, v in kw.items():
        setattr(h, k, v)
    return h


def announce(tid: str, epoch: int = 1) -> bytes:
    h = header(tid, epoch, layer_start=0, num_layers=2)
    h.shards.add(tp_rank=0, head_start=0, num_heads=2)
    return h.SerializeToString()


def inbox_with(tid: str = "t", lease_s: float = 30.0) -> tuple[IpcInbox, IpcKVReceiver, Ends]:
    ends = Ends()
    inbox = IpcInbox(LAYOUT, router=None, poll_ms=10)
    rx = IpcKVReceiver(LAYOUT, tid, 1, [4, 5, 6], time.time() + lease_s, 1, lambda name: name == "p.1", ends)
    inbox.expect(rx)
    return inbox, rx, ends


def test_an_announce_is_granted_once_and_the_finish_ends_the_transfer_with_the_first_token():
    inbox, rx, ends = inbox_with()
    ack = inbox._dispatch(b"p", announce("t"), [])
    assert ack.granted and ack.ok and rx.state == TransferState.TRANSFERRING
    assert inbox._dispatch(b"p", announce("t"), []).error == "announced twice"


def test_the_finish_after_the_grant_admits_with_the_first_token():
    inbox, rx, ends = inbox_with()
    inbox._dispatch(b"p", announce("t"), [])
    ack = inbox._dispatch(b"p", header("t", last=True, first_token=42).SerializeToString(), [])
    assert ack.ok and not ack.granted and rx.state == TransferState.DONE and rx.first_token == 42


def test_a_stale_epoch_is_refused_and_never_granted():
    inbox, rx, ends = inbox_with()
    ack = inbox._dispatch(b"p", announce("t", epoch=0), [])
    assert not ack.ok and not ack.granted and "stale epoch 0" in ack.error
    assert not rx.granted and rx.state == TransferState.WAITING


@pytest.mark.parametrize("case", ["lease", "pair set", "cancelled"])
def test_no_grant_after_the_lease_for_an_unknown_pair_set_or_once_cancelled(case):
    inbox, rx, ends = inbox_with(lease_s=-1 if case == "lease" else 30)
    data = announce("t")
    if case == "pair set":
        h = kv_pb2.KVHeader.FromString(data)
        h.pair_set = "p.0"
        data = h.SerializeToString()
    if case == "cancelled":
        assert rx.cancel()
        assert rx.state == TransferState.FAILED and ends.ended == ["t"]
        return
    ack = inbox._dispatch(b"p", data, [])
    assert not ack.ok and not ack.granted and rx.state == TransferState.FAILED and ends.ended == ["t"]
    assert ("lease expired" if case == "lease" else "unknown pair set") in ack.error


def test_a_granted_receiver_outlives_its_lease_and_a_cancel_until_the_prefill_node_is_done():
    inbox, rx, ends = inbox_with(lease_s=0.05)
    inbox._dispatch(b"p", announce("t"), [])
    time.sleep(0.1)
    rx.lease_expiry = time.time() - 1   # a renewal as the decode node writes it: the grant still holds
    inbox._sweep()
    assert rx.cancel() and rx.state == TransferState.TRANSFERRING, "copies may still land: the blocks stay"
    inbox._dispatch(b"p", header("t", last=True, first_token=3).SerializeToString(), [])
    assert rx.state == TransferState.FAILED and rx.error == "cancelled" and ends.ended


@pytest.mark.parametrize("how", ["withdrawn", "prefill node gone"])
def test_a_granted_receiver_ends_at_a_withdrawal_or_when_its_prefill_node_leaves(how):
    inbox, rx, ends = inbox_with()
    inbox._dispatch(b"p", announce("t"), [])
    if how == "withdrawn":
        inbox._dispatch(b"p", header("t", last=True, withdrawn=True).SerializeToString(), [])
    else:
        rx.peer_gone("the prefill node of pair set p.1 left")
    assert rx.state == TransferState.FAILED and ends.ended == ["t"]


# the prefill side: finish and withdrawal

def sender() -> tuple[IpcKVSender, list[Outgoing]]:
    out: list[Outgoing] = []
    ps = PairSet("p.1", 2, 1, 1, endpoint="tcp://x")
    tx = IpcKVSender(LAYOUT, ps, "t", 1, [4, 5, 6], lambda s, o: out.append(o))
    return tx, out


def test_the_finish_goes_only_once_the_copies_ran_and_the_first_token_is_known():
    tx, out = sender()
    assert tx.save.remote_block_ids == (4, 5, 6)
    tx.claim()
    tx.on_ack(kv_pb2.KVAck(transfer_id="t", ok=True, granted=True))
    assert tx.grant.state == TransferState.DONE and len(out) == 1
    tx.saving()
    tx.complete(9, None)
    assert len(out) == 1, "no finish while the copies may still run"
    tx.on_data(True, "")
    assert out[-1].last and out[-1].first_token == 9
    assert tx.state == TransferState.TRANSFERRING
    h = kv_pb2.KVHeader.FromString(tx.build_message(out[-1])[0])
    assert h.last and not h.withdrawn and tx.state == TransferState.DONE


def test_a_withdrawal_during_the_copies_waits_for_them_and_a_failed_copy_withdraws():
    tx, out = sender()
    tx.claim()
    tx.saving()
    tx.withdraw("aborted")
    assert len(out) == 1, "the blocks may still be written: no withdrawal yet"
    tx.on_data(False, "checksum mismatch in layer 1")
    h = kv_pb2.KVHeader.FromString(tx.build_message(out[-1])[0])
    assert h.withdrawn and tx.state == TransferState.FAILED and tx.error == "aborted"


def test_a_sender_refused_at_its_announce_fails_and_sends_nothing_more():
    tx, out = sender()
    tx.claim()
    tx.on_ack(kv_pb2.KVAck(transfer_id="t", ok=False, error="stale epoch 1, expected 2"))
    assert tx.grant.state == TransferState.FAILED and tx.state == TransferState.FAILED
    tx.withdraw("given up")
    assert len(out) == 1


def test_auto_is_cuda_ipc_only_for_gpu_pairs_of_one_host_and_says_why_otherwise():
    assert auto_choice("cuda:0", "prefill", "127.0.0.1:50051") == ("cuda-ipc", "")
    assert auto_choice("cuda", "decode", "localhost:1") == ("cuda-ipc", "")
    assert auto_choice("cpu", "decode", "127.0.0.1:1") == ("zmq", "")
    assert auto_choice("cuda:1", "both", "127.0.0.1:1") == ("zmq", ""), "a colocated node moves no KV"
    transport, why = auto_choice("cuda:0", "prefill", "10.0.0.7:50051")
    assert transport == "zmq" and "not on loopback" in why and "--kv-transport cuda-ipc" in why
    assert resolve("nccl", "cpu") == "nccl" and resolve("auto", "cuda:0", "decode", "[::1]:5") == "cuda-ipc"


def test_a_sender_failed_from_outside_after_its_announce_withdraws_so_the_blocks_are_freed():
    tx, out = sender()
    tx.claim()
    tx.on_ack(kv_pb2.KVAck(transfer_id="t", ok=True, granted=True))
    tx.fail("send failed: a bug")
    assert out[-1].last and out[-1].first_token < 0, "a withdrawal is queued"
    h = kv_pb2.KVHeader.FromString(tx.build_message(out[-1])[0])
    assert h.withdrawn and tx.state == TransferState.FAILED and tx.error == "send failed: a bug"
