"""Tensor-parallel process group: one rank per process, gloo on CPU, NCCL on GPU.

rank()/world() describe the group being built and are read while a model is
constructed; layers keep their own copy, and the collectives below are called only
by layers and runners whose TP size is above 1."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

_rank = 0
_world = 1


def init(rank: int, world: int, store_path: str, backend: str, device: torch.device | None = None,
         timeout_s: float = 7 * 86400.0, check_alive=None) -> None:
    """Join the node's TP group. Ranks meet through a file store (no listening socket)
    and talk over loopback. The timeout is long because ranks other than 0 wait in a
    broadcast while the engine is idle. Rank 0 passes check_alive, called while it waits
    for the other ranks to arrive, so a rank that dies at start-up fails the start
    instead of hanging it."""
    global _rank, _world
    _rank, _world = rank, world
    if world == 1:
        return
    import os
    from datetime import timedelta
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # rank-to-rank links stay on loopback
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    store = dist.FileStore(store_path, world)
    store.set(f"arrived/{rank}", "1")
    if check_alive is not None:
        keys = [f"arrived/{r}" for r in range(world)]
        while not store.check(keys):
            check_alive()
            time.sleep(0.05)
    kwargs = {"device_id": device} if backend == "nccl" and device is not None else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


def destroy() -> None:
    global _rank, _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _world = 0, 1


def rank() -> int:
    return _rank


def world() -> int:
    return _world


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def gather(x: torch.Tensor, world_size: int) -> list[torch.Tensor] | None:
    """Every rank's x, in rank order, on rank 0; None elsewhere."""
    if world_size == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(world_size)] if dist.get_rank() == 0 else None
    dist.gather(x.contiguous(), parts, dst=0)
    return parts


def scatter(parts: list[torch.Tensor] | None, out: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank r receives parts[r] (given on rank 0) into out."""
    if world_size == 1:
        return out.copy_(parts[0])
    dist.scatter(out, [p.contiguous() for p in parts] if dist.get_rank() == 0 else None, src=0)
    return out


def broadcast(x: torch.Tensor) -> torch.Tensor:
    dist.broadcast(x, src=0)
    return x


def share_cpu_threads(world_size: int) -> None:
    """Give each CPU rank its share of the cores; oversubscribed ranks stall each other's collectives."""
    import os
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
