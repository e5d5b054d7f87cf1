"""The two rank processes of kv_nccl.py: plain sends of whole buffers (the raw
reference), and the barrier and shared start instant every timed transfer begins from."""
from __future__ import annotations

import time

import torch


class Link:
    """Plain sends or receives of whole buffers, in order: on a torch process group
    (its works) or on a kv_transfer.nccl.lib.Comm (on a stream of our own, an event after the last)."""

    def __init__(self, link, index: int, device: torch.device):
        from pdserve.kv_transfer.nccl.lib import Comm
        self.link, self.index, self.cuda = link, index, device.type == "cuda"
        self.comm = isinstance(link, Comm)
        self.stream = torch.cuda.Stream(device) if self.comm else None
        self.done = torch.cuda.Event() if self.comm else None
        self.works: list = []

    def issue(self, bufs: list[torch.Tensor], trace=None) -> None:
        op, peer = (self.link.send if self.index == 0 else self.link.recv), 1 - self.index
        for i, b in enumerate(bufs):
            if self.comm:
                op(b.data_ptr(), b.numel() * b.element_size(), peer, self.stream.cuda_stream)
            else:
                self.works.append(op([b], peer, 0))
            if trace and self.index == 0:
                trace.host(f"send {i} issued")
        if self.comm:
            self.done.record(self.stream)

    def wait(self, trace=None) -> None:
        if self.comm:
            while not self.done.query():
                pass
            if trace and self.index == 1:
                trace.host("received all")
            return
        for i, w in enumerate(self.works):
            until_completed(w, self.cuda)
            if trace and self.index == 1:
                trace.host(f"received {i}")
        self.works = []


def torch_nccl_group(store, prefix: str, index: int, device: torch.device):
    """A 2-rank ProcessGroupNCCL of torch with NCCL's own settings, connected by one tiny message."""
    import torch.distributed as dist
    from torch.distributed import PrefixStore
    group = dist.ProcessGroupNCCL(PrefixStore(f"{prefix}/", store), index, 2, dist.ProcessGroupNCCL.Options())
    t = torch.zeros(1, device=device)
    (group.send([t], 1, 0) if index == 0 else group.recv([t], 0, 0)).wait()
    torch.cuda.synchronize(device)
    return group



def start_together(store, tag: str, index: int, lead_s: float = 0.002) -> float:
    """Both rank processes meet at the barrier; the sender then names a start instant
    lead_s ahead on the host's monotonic clock and both return it, the sender by spinning
    until it comes. The sender starts from a running core rather than from waking up after
    a store round trip (on these hosts that alone cost ours, dozens of Python and CUDA
    calls, a few hundred microseconds, and raw one call), and both ends share one t0."""
    barrier(store, tag)
    if index == 0:
        t0 = time.perf_counter() + lead_s
        store.set(f"t0/{tag}", repr(t0))
        while time.perf_counter() < t0:
            pass
        return t0
    return float(store.get(f"t0/{tag}"))


def barrier(store, tag: str) -> None:
    """Both rank processes leave together (to within a store round trip)."""
    store.add(f"barrier/{tag}", 1)
    while store.add(f"barrier/{tag}", 0) < 2:
        pass


def until_ended(rank, key: int) -> None:
    while True:
        done = rank.poll()
        if key in done:
            ok, error = done[key]
            if not ok:
                raise RuntimeError(f"transfer {key} failed: {error}")
            return
        if not rank.cuda:
            time.sleep(0)  # gloo: let the thread waiting for the works take the GIL


def until_completed(work, cuda: bool) -> None:
    if cuda:
        while not work.is_completed():
            pass
    work.wait()  # gloo: its works complete only through wait()


