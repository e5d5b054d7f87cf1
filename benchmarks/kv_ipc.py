"""cuda-ipc copy speed: a prompt's KV into the reserved blocks of another process's pool.

    python benchmarks/kv_ipc.py [--shape llama-3.1-8b] [--tokens 4096] [--iters 20]
    python benchmarks/kv_ipc.py --device cpu --shape tiny --tokens 256 --iters 3    # the CPU double (CI)

A child process (the decode node's rank) allocates a paged KV pool of the shape (bf16 on
GPU, [layers, blocks, block_size, kv_heads, head_dim] for k and v) and exports it as the
transport does (kv_transfer/cuda_ipc/export.py: a KVIpcExport protobuf message on its
stdout, never pickled). This process (the prefill rank) opens it and moves a --tokens
prompt's KV from its own pool into --tokens / block_size reserved blocks of the child's
with the transport's copy layer (kv_transfer/cuda_ipc/copier.py, on a side stream): the
blocks as a fresh pool hands them out (consecutive) and scattered, layer by layer
(eager prefill) and all layers at once (a replayed graph), with the fused kernel
(kernels.py) and its checksums sampled (as the nodes run it), full or off, and with
torch's copies and checksums (the path a peer on another GPU takes). Peer: one
contiguous copy of the same bytes into the child's pool on the same stream, the raw
device copy. ratio = raw time / ours (consecutive blocks, layer by layer, as the nodes
run it); target >= 0.9. Times are medians of --iters runs
after warm-up, measured with CUDA events (wall time on CPU)."""
from __future__ import annotations

import argparse
import random
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import hf_config, write_result
from pdserve.kv_transfer.cuda_ipc import kernels
from pdserve.kv_transfer.cuda_ipc.copier import Copier, Peer, Route
from pdserve.kv_transfer.cuda_ipc.export import export_pool, open_pool
from pdserve.v1 import kv_pb2

BLOCK = 16


def pool_shape(shape: str, blocks: int) -> tuple[int, ...]:
    cfg = hf_config(shape)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, blocks, BLOCK, cfg.num_key_value_heads, head_dim


def child(a: argparse.Namespace) -> None:
    """The decode side: allocate, export, wait for the parent to finish (stdin closes)."""
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    k, v = (torch.zeros(pool_shape(a.shape, a.pool_blocks), dtype=dtype, device=a.device) for _ in range(2))
    data = export_pool(k, v, 0).SerializeToString()
    sys.stdout.buffer.write(struct.pack("<I", len(data)) + data)
    sys.stdout.buffer.flush()
    sys.stdin.buffer.read()


class Clock:
    def __init__(self, stream):
        self.stream = stream

    def time(self, fn) -> float:
        if self.stream is None:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record()
            fn()
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def measure(clock: Clock, fn, iters: int) -> float:
    for _ in range(2):
        clock.time(fn)
    return statistics.median(clock.time(fn) for _ in range(iters))


def run(a: argparse.Namespace) -> None:
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--device", a.device, "--shape", a.shape,
                             "--pool-blocks", str(a.pool_blocks)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=Path(__file__).parent)
    try:
        n = struct.unpack("<I", proc.stdout.read(4))[0]
        peer_k, peer_v = open_pool(kv_pb2.KVIpcExport.FromString(proc.stdout.read(n)))
        result(a, peer_k, peer_v)
    finally:
        proc.stdin.close()
        proc.wait()


def result(a: argparse.Namespace, peer_k: torch.Tensor, peer_v: torch.Tensor) -> None:
    layers, pool, _, heads, dim = peer_k.shape
    nb = a.tokens // BLOCK
    k, v = (torch.randn(layers, nb * 2, BLOCK, heads, dim, device=a.device).to(peer_k.dtype) for _ in range(2))
    stream = torch.cuda.Stream() if a.device == "cuda" else None
    if stream is not None:
        torch.cuda.synchronize()  # the pools' contents are written before the side stream reads them
    clock = Clock(stream)
    peer = Peer("bench/0-0", peer_k, peer_v, 0)
    rng = random.Random(0)
    cases = {"consecutive": (list(range(nb)), list(range(pool // 4, pool // 4 + nb))),
             "scattered": (rng.sample(range(nb * 2), nb), rng.sample(range(pool), nb))}
    nbytes = 2 * layers * nb * BLOCK * heads * dim * k.element_size()
    src_flat = torch.empty(nbytes // k.element_size(), dtype=k.dtype, device=a.device)
    dst_flat = peer_k.view(-1)[:src_flat.numel() // 2], peer_v.view(-1)[:src_flat.numel() // 2]
    raw = measure(clock, lambda: (dst_flat[0].copy_(src_flat[:src_flat.numel() // 2], non_blocking=True),
                                  dst_flat[1].copy_(src_flat[src_flat.numel() // 2:], non_blocking=True)), a.iters)
    rows = {}
    modes = {"sampled checksums": dict(), "full checksums": dict(full_checksums=True),
             "no checksums": dict(verify=False), "torch copies, full checksums": dict(kernels=False)}
    for case, (src_ids, dst_ids) in cases.items():
        for mode, kw in modes.items():
            copier = Copier(k, v, stream, **kw)
            for at_once in (False, True):
                def transfer():
                    job = copier.job(1, [Route(peer, 0, heads)], src_ids, dst_ids)
                    if at_once:  # a replayed prefill graph: every layer computed before the copies
                        copier.copy_layers(job, 0, layers)
                    else:        # eager prefill: each layer's copy queued from its hook
                        for layer in range(layers):
                            copier.copy_layer(job, layer)
                    return job
                t = measure(clock, transfer, a.iters)
                job = transfer()
                if stream is not None:
                    stream.synchronize()
                assert copier.check(job) == "" and torch.equal(peer_k[:, dst_ids[:1]], k[:, src_ids[:1]])
                name = f"{case}, {mode}{', all layers at once' if at_once else ''}"
                rows[name] = dict(ms=round(t * 1e3, 4), gb_s=round(nbytes / t / 1e9, 2), ratio=round(raw / t, 4))
                print(f"{name:58s} {t * 1e3:8.3f} ms  {nbytes / t / 1e9:7.1f} GB/s  raw/ours {raw / t:.3f}",
                      flush=True)
    tune = sweep(a, clock, k, v, stream, peer, heads, layers, cases["consecutive"], raw) if a.tune else None
    print(f"{'raw contiguous copy':58s} {raw * 1e3:8.3f} ms  {nbytes / raw / 1e9:7.1f} GB/s")
    ratio = rows["consecutive, sampled checksums"]["ratio"]
    print(f"ratio raw / ours (consecutive blocks, layer by layer, sampled checksums): {ratio:.3f}  target >= 0.9")
    config = dict(shape=a.shape, tokens=a.tokens, block_size=BLOCK, dtype=str(k.dtype).removeprefix("torch."),
                  layers=layers, kv_heads=heads, head_dim=dim, bytes=nbytes, iters=a.iters, device=a.device,
                  same_gpu=True, method="median of CUDA-event-timed transfers on one side stream after warm-up")
    path = write_result(a.result_name, "kv_transfer_ipc", ratio, 0.9, config, commit_id=a.commit,
                        raw_ms=round(raw * 1e3, 4), raw_gb_s=round(nbytes / raw / 1e9, 2), rows=rows,
                        kernel=dict(num_warps=kernels.NUM_WARPS, tile_words=kernels.TILE_WORDS), tune=tune)
    print(f"-> {path}")


def sweep(a, clock, k, v, stream, peer, heads, layers, ids, raw) -> list[dict]:
    """--tune: the fused kernel's warps and tile size against raw, consecutive blocks, sampled
    checksums, layer by layer and all layers at once."""
    out, defaults = [], (kernels.NUM_WARPS, kernels.TILE_WORDS)
    for warps in (4, 8, 16):
        for tile in (2048, 4096, 8192):
            kernels.NUM_WARPS, kernels.TILE_WORDS = warps, tile
            copier = Copier(k, v, stream)
            row = dict(num_warps=warps, tile_words=tile)
            for at_once in (False, True):
                def transfer():
                    job = copier.job(1, [Route(peer, 0, heads)], *ids)
                    for first, count in ([(0, layers)] if at_once else [(i, 1) for i in range(layers)]):
                        copier.copy_layers(job, first, count)
                row["at_once" if at_once else "by_layer"] = round(raw / measure(clock, transfer, a.iters), 4)
            print(f"tune warps {warps:2d} tile {tile:5d}: raw/ours layer by layer {row['by_layer']:.3f}, "
                  f"all at once {row['at_once']:.3f}", flush=True)
            out.append(row)
    kernels.NUM_WARPS, kernels.TILE_WORDS = defaults
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--pool-blocks", type=int, default=2048, help="blocks of the child's pool")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--commit", default=None)
    ap.add_argument("--result-name", default="kv_transfer_ipc")
    ap.add_argument("--tune", action="store_true", help="also sweep the fused kernel's warps and tile size (GPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
