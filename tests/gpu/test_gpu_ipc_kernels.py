"""The cuda-ipc fused copy kernel (kv_transfer/cuda_ipc/kernels.py) through the Copier:
the reserved blocks hold exactly the source heads, nothing else is written, the
checksums agree (sampled and full), and a corrupted, misplaced or overwritten block is
caught at its layer. Skipped without CUDA unless TRITON_INTERPRET=1
(tests/test_ipc_transport.py runs this file that way on CPU).

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_ipc_kernels.py"""
from __future__ import annotations

import os
import random

import pytest
import torch

from pdserve.kv_transfer.cuda_ipc.copier import Copier, Peer, Route

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET, reason="needs CUDA")
DEV = "cpu" if INTERPRET else "cuda"


def pools(layers, blocks, bs, heads, dim, dtype, fill: bool):
    make = (lambda: torch.randn(layers, blocks, bs, heads, dim, device=DEV).to(dtype)) if fill else \
        (lambda: torch.zeros(layers, blocks, bs, heads, dim, device=DEV, dtype=dtype))
    return make(), make()


def run(copier: Copier, job, layers: int, at_once: bool) -> str:
    if at_once:
        copier.copy_layers(job, 0, layers)
    else:
        for layer in range(layers):
            copier.copy_layer(job, layer)
    if copier.stream is not None:
        copier.stream.synchronize()
    return copier.check(job)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("at_once", [False, True])
@pytest.mark.parametrize("dtype,bs,heads,dim,src_head,dst_heads,dst_head", [
    (torch.bfloat16, 16, 8, 128, 0, 8, 0),     # an 8B-shaped rank, all heads
    (torch.float32, 4, 2, 16, 1, 3, 2),        # one head of two into head 2 of three (re-sliced TP)
    (torch.bfloat16, 16, 4, 64, 2, 2, 0),      # heads 2..3 into a decode rank of two
])
def test_the_kernel_moves_exactly_the_heads_and_the_checksums_agree(dtype, bs, heads, dim, src_head, dst_heads,
                                                                    dst_head, at_once, full):
    layers, blocks, peer_blocks = 3, 24, 40
    moved = min(heads - src_head, dst_heads - dst_head)
    k, v = pools(layers, blocks, bs, heads, dim, dtype, True)
    pk, pv = pools(layers, peer_blocks, bs, dst_heads, dim, dtype, False)
    rng = random.Random(bs * heads)
    src_ids, dst_ids = rng.sample(range(blocks), 9), rng.sample(range(peer_blocks), 9)
    stream = torch.cuda.Stream() if DEV == "cuda" else None
    copier = Copier(k, v, stream, kernels=True, full_checksums=full)
    job = copier.job(1, [Route(Peer("p/0-0", pk, pv, dst_head), src_head, moved)], src_ids, dst_ids)
    assert job.rows is not None, "the fused kernel applies"
    assert run(copier, job, layers, at_once) == ""
    for got, want in ((pk, k), (pv, v)):
        assert torch.equal(got[:, dst_ids, :, dst_head:dst_head + moved],
                           want[:, src_ids, :, src_head:src_head + moved])
        others = torch.ones(peer_blocks, dtype=torch.bool)
        others[dst_ids] = False
        assert not got[:, others].any() and not got[:, :, :, :dst_head].any(), "only the reserved heads are written"
    if full:  # the full checksum is the int32 word sum of each row, mod 2**32, weighted by its index + 1
        rows = job.rows[0, 0].cpu()
        for layer in range(layers):
            for kv, t in enumerate((k, v)):
                for j, b in enumerate(src_ids):
                    words = t[layer, b, :, src_head:src_head + moved].contiguous().view(torch.int32)
                    s = int(words.to(torch.int64).sum()) & 0xFFFFFFFF
                    s = s - (1 << 32) if s >= 1 << 31 else s
                    assert int(rows[layer, kv * len(src_ids) + j]) == s * (kv * len(src_ids) + j + 1)


@pytest.mark.parametrize("full", [False, True])
def test_a_corrupted_or_overwritten_block_is_caught_at_its_layer(full):
    layers, bs, heads, dim = 2, 4, 2, 16
    k, v = pools(layers, 8, bs, heads, dim, torch.float32, True)
    pk, pv = pools(layers, 8, bs, heads, dim, torch.float32, False)
    copier = Copier(k, v, kernels=True, full_checksums=full)
    job = copier.job(7, [Route(Peer("p.1/0-0", pk, pv, 0), 0, heads)], [0, 1], [2, 3], corrupt=True)
    assert run(copier, job, layers, False) == "checksum mismatch (k, layer 0, pair p.1/0-0)"

    class Before:  # `act` runs right before the destination's checksum launch, after every copy
        def __init__(self, launch, act):
            self.launch, self.act = launch, act

        def run(self, *a):
            if not self.launch.meta[5]:
                self.act()
            self.launch.run(*a)

    plan = copier.pool.plan

    def with_act(act):
        copier.pool.plan = lambda *a, **kw: Before(plan(*a, **kw), act)
        job = copier.job(8, [Route(Peer("p.1/0-0", pk, pv, 0), 0, heads)], [0, 1], [2, 3])
        return run(copier, job, layers, False)

    def overwrite():  # the decode side wrote into a reserved v block of layer 1
        pv[1, 3] = 5.0

    def swap():  # two destination blocks swapped: each row's checksum carries its index
        pk[1, [2, 3]] = pk[1, [3, 2]].clone()
    assert with_act(overwrite) == "checksum mismatch (v, layer 1, pair p.1/0-0)"
    assert with_act(swap) == "checksum mismatch (k, layer 1, pair p.1/0-0)"
    assert with_act(lambda: None) == ""
