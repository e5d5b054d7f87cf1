"""kv_nccl.py --diag and --profile: where a transfer's time goes. The split kind's
buffers, the data mover's kernels and host calls timed alone, traced transfers of both
ends merged into one timeline, and one transfer under torch.profiler."""
from __future__ import annotations

import array
import json
import statistics
import time
from pathlib import Path

import torch

from kv_nccl_link import barrier, start_together, until_ended


def split_buffers(rank, blocks, groups, heads, index) -> list[torch.Tensor]:
    """--diag's split kind: ours's messages, gathered once beforehand, and a tail of the same size."""
    idx = torch.tensor(blocks, dtype=torch.long, device=rank.device)
    bufs = [rank.bufs.gather(idx, l0, l1, 0, heads) for l0, l1 in groups]
    if index == 1:
        bufs = [torch.empty_like(b) for b in bufs]
    return [*bufs, torch.zeros(3 + rank.kv.num_layers, dtype=torch.int64, device=rank.device)]


def kernel_times(rank, blocks, groups, heads) -> dict:
    """GPU time of the data-mover's kernels alone (no transfer running), median of 5, ms, for
    every message: the fused gather (or scatter) + checksum kernels RankKV runs, and the
    torch ops it runs where they do not apply (gather, checksum, scatter)."""
    from pdserve.kv_transfer.nccl.verify import checksum
    idx = torch.tensor(blocks, dtype=torch.long, device=rank.device)
    bufs = [rank.bufs.gather(idx, l0, l1, 0, heads) for l0, l1 in groups]
    steps = {"torch_gather": lambda: [rank.bufs.gather(idx, l0, l1, 0, heads) for l0, l1 in groups],
             "torch_checksum": lambda: [checksum(b) for b in bufs],
             "torch_scatter": lambda: [rank.bufs.scatter(idx, l0, l1, 0, heads, b) for (l0, l1), b in zip(groups, bufs)]}
    if rank.gpu is not None and rank.gpu.mover is not None:  # what RankKV runs: gather/scatter and checksum in one kernel per message
        flat = [b.view(-1).view(torch.int32) for b in bufs]
        rows = torch.empty((rank.kv.num_layers, 2 * len(blocks)), dtype=torch.int64, device=rank.device)
        for name, scatter in (("fused_gather", False), ("fused_scatter", True)):
            steps[name] = lambda scatter=scatter: [rank.gpu.mover.move(idx, l0, l1, 0, heads, b, rows, scatter)
                                                   for (l0, l1), b in zip(groups, flat)]
    out = {}
    for name, fn in steps.items():
        samples = []
        for _ in range(6):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b))
        out[name] = round(statistics.median(samples[1:]), 4)
    return out


def host_costs(rank, blocks, groups, heads) -> dict:
    """Host time of the steps a send issues, microseconds per call (median of 5 rounds of 20)."""
    idx = torch.tensor(blocks, dtype=torch.long, device=rank.device)
    (l0, l1), nb = groups[0], len(blocks)
    buf = rank.bufs.gather(idx, l0, l1, 0, heads)
    rows = torch.empty((rank.kv.num_layers, 2 * nb), dtype=torch.int64, device=rank.device)
    event = torch.cuda.Event()
    ids = torch.tensor(blocks, dtype=torch.long)

    def pinned_ids():
        t = rank.gpu.host_ids.take(array.array("q", blocks))
        rank.gpu.host_ids.release(t, torch.cuda.current_stream())

    steps = {"block ids to pinned buffer (pool)": pinned_ids,
             "torch.tensor(block ids)": lambda: torch.tensor(blocks, dtype=torch.long),
             "pin_memory()": lambda: ids.pin_memory(),
             "empty pinned": lambda: torch.empty(len(blocks), dtype=torch.long, pin_memory=True),
             "message buffer (torch.empty)": lambda: rank.bufs.empty(l1 - l0, nb, heads),
             "event record": lambda: event.record(),
             "event query": lambda: event.query()}
    if rank.gpu is not None and rank.gpu.mover is not None:
        flat = buf.view(-1).view(torch.int32)
        steps["fused gather launch"] = lambda: rank.gpu.mover.move(idx, l0, l1, 0, heads, flat, rows, False)
        steps["int32 view"] = lambda: buf.view(-1).view(torch.int32)
    out = {}
    for name, fn in steps.items():
        samples = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            samples.append((time.perf_counter() - t0) / 20 * 1e6)
        out[name] = round(statistics.median(samples), 1)
    torch.cuda.synchronize()
    return out


def traced(index, rank, store, ci, blocks, pair, heads, layers, wires, runs: int = 7) -> dict:
    """Transfers with RankKV's Trace on, both ends leaving a barrier together as in the timed
    runs: per kind (ours and the plain ones), per run, this rank's marks (label, host
    seconds). For the plain kinds the sender marks its entry and each send issued, the
    receiver the receives completed: the host cost of cold send calls beside ours."""
    from pdserve.kv_transfer.nccl.trace import Trace
    rank.gpu.trace, out = Trace(rank.device), {kind: [] for kind in ("ours", *wires)}
    trace = rank.gpu.trace
    for run in range(runs):
        for kind in out:
            key, tag = 2 * 10**6 + len(out) * run + len(out[kind]), f"trace/{ci}/{run}/{kind}"
            link, bufs = wires.get(kind, (None, None))
            if index == 0:
                start_together(store, tag, index)
                if kind == "ours":
                    rank.send(key, blocks, [(pair, 0, heads)])
                else:
                    trace.host("send entered")
                    link.issue(bufs, trace)
            else:
                if kind == "ours":
                    rank.recv(key, blocks, [(pair, 0, heads)], layers)
                else:
                    link.issue(bufs)
                start_together(store, tag, index)
            if kind == "ours":
                until_ended(rank, key)
            else:
                link.wait(trace)
            out[kind].append(trace.report())
    rank.gpu.trace = None
    return out


def timeline(sender: list, receiver: list) -> list:
    """The traced runs of both ends merged: per step, the median over runs of its time after
    the sender entered send(), microseconds, in order."""
    steps: dict[str, list[float]] = {}
    for s_marks, r_marks in zip(sender, receiver):
        t0 = next(t for label, t in s_marks if label == "send entered")
        for side, marks in (("sender", s_marks), ("receiver", r_marks)):
            for label, t in marks:
                steps.setdefault(f"{side}: {label}", []).append((t - t0) * 1e6)
    rows = [(name, round(statistics.median(ts), 1)) for name, ts in steps.items()]
    return sorted(rows, key=lambda r: r[1])


def profile_one(args, index, rank, store, ci, blocks, pair, heads, layers) -> dict:
    """One more transfer of ours under torch.profiler: its GPU kernels and copies, per
    stream, in microseconds from the first of them (a compact timeline of this rank)."""
    from torch.profiler import ProfilerActivity, profile
    key = 10**6 + ci
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if index == 0:
            barrier(store, f"profile/{ci}")
            rank.send(key, blocks, [(pair, 0, heads)])
        else:
            rank.recv(key, blocks, [(pair, 0, heads)], layers)
            barrier(store, f"profile/{ci}")
        until_ended(rank, key)
        torch.cuda.synchronize()
    path = Path(args.profile) / f"trace_{ci}_{index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    path.unlink()
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {}
    t0 = min(e["ts"] for e in gpu)
    rows = [dict(name=e["name"][:70], stream=e.get("args", {}).get("stream"), start_us=round(e["ts"] - t0, 1),
                 dur_us=round(e["dur"], 1)) for e in sorted(gpu, key=lambda e: e["ts"])]
    cpu = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    host_us = round(max(e["ts"] + e["dur"] for e in cpu) - min(e["ts"] for e in cpu), 1) if cpu else None
    return dict(gpu=rows, host_span_us=host_us)

