"""The NCCL data mover's fused gather/scatter + checksum kernels (kv_transfer/nccl/kernels.py)
against the torch path they replace, bit for bit: the gathered message, the blocks written
back, the blocks left alone and the per-layer checksums, for bfloat16 and float32 caches,
every head slice shape RankKV uses and shuffled block ids. Skipped without CUDA unless
TRITON_INTERPRET=1 (tests/test_nccl_rank.py runs this file that way on CPU).

Run on a GPU host: PYTHONPATH=. python -m pytest -q tests/gpu/test_gpu_kv_kernels.py"""
from __future__ import annotations

import os
import random

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRET, reason="needs CUDA")
DEV = "cpu" if INTERPRET else "cuda"


def gather_ref(k, v, idx, l0, l1, head, heads):
    buf = torch.empty((l1 - l0, 2, len(idx), k.shape[2], heads, k.shape[4]), dtype=k.dtype, device=k.device)
    for src, i in ((k, 0), (v, 1)):
        buf[:, i] = src[l0:l1, :, :, head:head + heads].index_select(1, idx)
    return buf


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("programs", [0, 5])  # a program per block row; 5 programs looping over them
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layers,num_blocks,block_size,kv_heads,head_dim",
                         [(4, 40, 16, 8, 64), (3, 7, 4, 3, 32), (2, 5, 16, 2, 128)])
def test_move_matches_torch(dtype, layers, num_blocks, block_size, kv_heads, head_dim, programs):
    from pdserve.kv_transfer.nccl import kernels as nccl_kernels
    from pdserve.kv_transfer.nccl.verify import checksum
    rng = random.Random(layers * num_blocks)
    shape = (layers, num_blocks, block_size, kv_heads, head_dim)
    k, v = (torch.randn(shape, device=DEV).to(dtype) for _ in range(2))
    slices = {(0, kv_heads), (kv_heads - 1, 1), (1, kv_heads - 2) if kv_heads > 2 else (0, 1)}
    for head, heads in sorted(slices):
        ids = rng.sample(range(num_blocks), num_blocks // 2 + 1)
        idx = torch.tensor(ids, device=DEV)
        for l0, l1 in ((0, layers), (1, layers), (layers - 1, layers)):
            assert nccl_kernels.supported(k, head, heads)
            ref = gather_ref(k, v, idx, l0, l1, head, heads)
            buf = torch.full_like(ref, 7)
            rows = torch.zeros((layers, 2 * len(ids)), dtype=torch.int64, device=DEV)
            nccl_kernels.move(k, v, idx, l0, l1, head, heads, buf, rows, scatter=False, programs=programs)
            assert same_bits(buf, ref)
            assert torch.equal(rows[l0:l1].sum(1), checksum(ref))
            assert (rows[:l0] == 0).all() and (rows[l1:] == 0).all()

            k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
            back = torch.zeros_like(rows)
            nccl_kernels.move(k2, v2, idx, l0, l1, head, heads, buf, back, scatter=True, programs=programs)
            assert torch.equal(back, rows)
            for got, want in ((k2, k), (v2, v)):
                assert same_bits(got[l0:l1, ids, :, head:head + heads], want[l0:l1, ids, :, head:head + heads])
                written = torch.zeros_like(got, dtype=torch.bool)
                written[l0:l1, ids, :, head:head + heads] = True
                assert (got[~written] == 0).all()  # nothing outside the message's blocks, layers and heads


def test_preload_writes_nothing():
    from pdserve.kv_transfer.nccl import kernels as nccl_kernels
    k = torch.randn((2, 9, 16, 4, 64), device=DEV).to(torch.bfloat16)
    before = k.clone()
    nccl_kernels.preload(k, [1, 2, 3, 4])
    assert same_bits(k, before)


@pytest.mark.skipif(INTERPRET, reason="the direct launch and page-locked ids are GPU-only")
def test_mover_direct_launch_and_host_ids():
    """One Mover over many calls, as RankKV uses it: after the first call per (heads, gather
    or scatter) it launches the compiled kernel directly, on the stream it is given, and
    reads block ids from page-locked host memory in place. Every call matches torch."""
    from pdserve.kv_transfer.nccl import kernels as nccl_kernels
    from pdserve.kv_transfer.nccl.verify import checksum
    layers, num_blocks, kv_heads = 4, 64, 8
    k, v = (torch.randn((layers, num_blocks, 16, kv_heads, 64), device=DEV).to(torch.bfloat16) for _ in range(2))
    mover = nccl_kernels.Mover(k, v)
    side = torch.cuda.Stream()
    rng = random.Random(5)
    for call in range(12):
        head, heads = ((0, kv_heads), (3, 2), (kv_heads - 1, 1))[call % 3]
        ids = rng.sample(range(num_blocks), rng.randint(1, 40))
        l0 = rng.randrange(layers)
        l1 = rng.randint(l0 + 1, layers)
        on_host = call % 2 == 1
        idx = torch.tensor(ids, dtype=torch.long)
        idx = idx.pin_memory() if on_host else idx.to(DEV)
        ref = gather_ref(k, v, idx.to(DEV), l0, l1, head, heads)
        buf = torch.full_like(ref, 7)
        rows = torch.zeros((layers, 2 * len(ids)), dtype=torch.int64, device=DEV)
        side.wait_stream(torch.cuda.current_stream())
        mover.move(idx, l0, l1, head, heads, buf.view(-1).view(torch.int32), rows, False, stream=side)
        k2, v2 = torch.zeros_like(k), torch.zeros_like(v)
        back = torch.zeros_like(rows)
        scattered = nccl_kernels.Mover(k2, v2)
        scattered._compiled = mover._compiled  # the same compiled kernels serve a same-shaped cache
        scattered.move(idx, l0, l1, head, heads, buf.view(-1).view(torch.int32), back, True, stream=side)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert same_bits(buf, ref), call
        assert torch.equal(rows[l0:l1].sum(1), checksum(ref)) and torch.equal(back, rows)
        assert same_bits(k2[l0:l1, ids, :, head:head + heads], k[l0:l1, ids, :, head:head + heads])
        assert same_bits(v2[l0:l1, ids, :, head:head + heads], v[l0:l1, ids, :, head:head + heads])
    assert len(mover._compiled) == 6  # three head counts, gather and scatter: later calls went direct
    # by address (RankKV's send path): the same bytes and row sums as move(), on a raw stream handle
    ids = rng.sample(range(num_blocks), 33)
    idx = torch.tensor(ids, dtype=torch.long).pin_memory()
    ref = gather_ref(k, v, idx.to(DEV), 1, 3, 3, 2)
    buf = torch.full_like(ref, 7)
    rows = torch.zeros((layers, 2 * len(ids)), dtype=torch.int64, device=DEV)
    side.wait_stream(torch.cuda.current_stream())
    assert mover.launch(idx.data_ptr(), buf.data_ptr(), rows.data_ptr(), 1, 3, 3, 2, False, len(ids), side.cuda_stream)
    assert not mover.launch(idx.data_ptr(), buf.data_ptr() + 4, rows.data_ptr(), 1, 3, 3, 2, False, len(ids),
                            side.cuda_stream)  # not aligned as compiled: nothing launched
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert same_bits(buf, ref) and torch.equal(rows[1:3].sum(1), checksum(ref))
