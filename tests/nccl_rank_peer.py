"""One rank process for the RankKV tests (tests/test_nccl_rank.py on CPU over gloo,
tests/gpu/test_gpu_nccl_rank.py over NCCL): builds a KVCache with known contents, runs
a script of RankKV operations given as JSON on the command line and prints one JSON
line per event on stdout (nothing is pickled; the cache is dumped as raw bytes).

    python -m tests.nccl_rank_peer '{"device": "cpu", "layers": 4, ..., "ops": [...]}'

Operations: open (pair, index), send (key, blocks, parts, [events], [corrupt]), recv
(key, blocks, parts), wait (keys: poll until each ended), pause (until a line on
stdin), dump (path: k then v of the whole cache), close."""
from __future__ import annotations

import json
import sys
import time

import torch

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.nccl import verify
from pdserve.kv_transfer.nccl.rank import RankKV


def cache_contents(seed: int, layers: int, blocks: int, block_size: int, heads: int, head_dim: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The k and v a rank seeded with `seed` starts with (CPU; the tests rebuild them)."""
    g = torch.Generator().manual_seed(seed)
    shape = (layers, blocks, block_size, heads, head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def fill_like_a_forward(kv: KVCache, k: torch.Tensor, v: torch.Tensor, delay_cycles: int, events: list,
                        rank: RankKV) -> None:
    """GPU: write each layer's k/v on the current stream after a delay, then record its event
    and report it queued (rank.layer_queued), as the prefill forward's layer hook does;
    returns with the layers still running on the device."""
    k, v = k.pin_memory(), v.pin_memory()
    for layer in range(kv.num_layers):
        torch.cuda._sleep(delay_cycles)
        kv.k[layer].copy_(k[layer], non_blocking=True)
        kv.v[layer].copy_(v[layer], non_blocking=True)
        events[layer].record()
        rank.layer_queued(layer)
    rank.end_streams()


def main(cfg: dict) -> None:
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    shape = (cfg["layers"], cfg["blocks"], cfg["block_size"], cfg["heads"], cfg["head_dim"])
    kv = KVCache(*shape, dtype, device)
    contents = cache_contents(cfg["seed"], *shape, dtype) if cfg.get("seed") is not None else None
    if contents is not None and not cfg.get("forward"):
        kv.k.copy_(contents[0])
        kv.v.copy_(contents[1])
    rank = RankKV(kv, device, timeout_s=cfg["timeout"], min_message_bytes=cfg.get("min_message_bytes", 64 << 20))
    host, port = cfg["store"]
    ended: dict[int, tuple[bool, str, float]] = {}
    started: dict[int, float] = {}

    def collect() -> None:
        for key, (ok, error) in rank.poll().items():
            ended[key] = (ok, error, time.monotonic() - started[key])
            emit(event="result", key=key, ok=ok, error=error, elapsed=round(ended[key][2], 3))

    for op in cfg["ops"]:
        kind = op["op"]
        if kind == "open":
            rank.open_pair(op["pair"], host, port, op["index"])
            emit(event="opened", pair=op["pair"], pairs=rank.pairs)
        elif kind in ("send", "step"):  # step: several transfers sent by one forward
            sends = op["sends"] if kind == "step" else [op]
            forward = cfg.get("forward") and device.type == "cuda"  # the cache fills while the sends are queued
            events = [torch.cuda.Event() for _ in range(cfg["layers"])] if forward else None
            gpu = rank.gpu
            saved, saved_mover = verify.checksum, gpu.mover if gpu is not None else None
            if op.get("corrupt"):  # the receiver must see a mismatch: the sender's checksums are off by one
                verify.checksum = lambda buf: saved(buf) + 1
                if gpu is not None:
                    gpu.mover = OffByOne(saved_mover) if saved_mover is not None else None
            try:
                for one in sends:
                    started[one["key"]] = time.monotonic()
                    rank.send(one["key"], one["blocks"], [tuple(p) for p in one["parts"]], events)
                if forward:
                    fill_like_a_forward(kv, *contents, cfg.get("delay_cycles", 20_000_000), events, rank)
            finally:
                verify.checksum = saved
                if gpu is not None:
                    gpu.mover = saved_mover
            for one in sends:
                emit(event="sent", key=one["key"], host_s=round(time.monotonic() - started[one["key"]], 4))
        elif kind == "recv":
            started[op["key"]] = time.monotonic()
            rank.recv(op["key"], op["blocks"], [tuple(p) for p in op["parts"]], cfg["layers"])
            emit(event="posted", key=op["key"])
        elif kind == "wait":
            deadline = time.monotonic() + op.get("limit", 3 * cfg["timeout"])
            while not all(k in ended for k in op["keys"]) and time.monotonic() < deadline:
                collect()
                time.sleep(0.002)
            for k in op["keys"]:
                if k not in ended:
                    emit(event="hung", key=k)
        elif kind == "pause":
            emit(event="paused")
            sys.stdin.readline()
        elif kind == "dump":
            if device.type == "cuda":
                torch.cuda.synchronize()
            with open(op["path"], "wb") as f:
                for t in (kv.k, kv.v):
                    f.write(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
            emit(event="dumped")
        elif kind == "close":
            rank.close()
            emit(event="closed", pairs=rank.pairs)
        else:
            raise ValueError(f"unknown operation {kind}")
    emit(event="done")


class OffByOne:
    """RankKV's fused mover (nccl_kernels.Mover) with each message's first checksum row one
    too high (the torch path's corruption is checksum + 1)."""

    def __init__(self, mover):
        self.mover = mover

    def launch(self, *args, **kwargs) -> bool:
        return False  # never by address: every message goes through move() below

    def move(self, idx, l0, l1, head, heads, buf, rows, scatter, nb=None, stream=None):
        self.mover.move(idx, l0, l1, head, heads, buf, rows, scatter, nb, stream)
        rows[l0, 0] += 1


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
