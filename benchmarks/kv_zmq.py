"""ZeroMQ KV transfer bandwidth: our transport next to bare pyzmq moving the same frames.

    python benchmarks/kv_zmq.py [--runs 15] [--endpoints tcp ipc]   # ~30 s on CPU -> results/kv_transfer_zmq.json
    python benchmarks/kv_zmq.py --curve [--endpoints tcp]          # CURVE on vs off -> kv_transfer_zmq_curve.json

For each case (a model-shaped KV of a prompt) and endpoint kind (tcp loopback, ipc),
ours = bytes / seconds from the first send_layers() to the receiver's DONE (all
layers checked with XXH3 and handed to write(), here a no-op); raw = the same
frames (same sizes, same number of messages, a header of the same size, copy=False)
through a bare pyzmq PUSH/PULL pair (one context per end, like ours), first send
to last message received. Runs alternate after a warm-up; the median of each is
reported, and ratio = ours / raw. Everything runs in this process, so both ends
share its CPUs. A diagnostic third column runs ours with the checksum stubbed out
(both ends), to show what integrity checking costs on this host; the transport
itself always checks.

--curve: ours with CURVE (encryption and authentication, a secured cluster's KV plane)
next to ours without, runs interleaved; ratio = CURVE GB/s / plain GB/s (no target)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import zmq

import pdserve.kv_transfer.base.header
from common import RESULTS, commit, uncommitted_changes
from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.curve import CurveKeys
from pdserve.v1 import node_pb2
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.zmq.manager import ZmqKVManager
from pdserve.kv_transfer.base.layout import unique_ranks


@dataclass(frozen=True)
class Case:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str


CASES = [
    Case("smollm2-135m fp32", 30, 3, 64, "float32"),
    Case("smollm2-135m bf16", 30, 3, 64, "bfloat16"),
    Case("llama-3.2-1b bf16", 16, 8, 64, "bfloat16"),
]
HEADLINE = ("llama-3.2-1b bf16", "tcp")


@dataclass
class Workload:
    case: Case
    layout: KVLayout
    num_blocks: int
    groups: list[list[list[torch.Tensor]]]  # per message: layers, each the prefill ranks' shards
    prefill_tp: int
    decode_tp: int

    @property
    def frames(self) -> list[list[torch.Tensor]]:
        """The tensors each message carries (replicated ranks are not sent)."""
        ranks = unique_ranks(self.prefill_tp, self.layout.num_kv_heads)
        return [[layer[r] for layer in group for r in ranks] for group in self.groups]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for msg in self.frames for t in msg)


def make_workload(case: Case, tokens: int, block_size: int, per_message: int, prefill_tp: int,
                  decode_tp: int) -> Workload:
    dtype = getattr(torch, case.dtype)
    lay = KVLayout.create(case.name, case.num_layers, case.num_kv_heads, case.head_dim, block_size, dtype)
    nb = -(-tokens // block_size)
    layers = []
    for _ in range(case.num_layers):  # what each rank's KVCache.export_layer returns
        full = torch.randn(lay.shard_shape(nb, case.num_kv_heads)).to(dtype)
        heads = [lay.heads(r, prefill_tp) for r in range(prefill_tp)]
        layers.append([full[:, :, :, s:e].contiguous() for s, e in heads])
    groups = [layers[i:i + per_message] for i in range(0, len(layers), per_message)]
    return Workload(case, lay, nb, groups, prefill_tp, decode_tp)


class Ours:
    """A decode and a prefill ZmqKVManager in this process."""

    def __init__(self, w: Workload, ipc_dir: str | None, curve: bool = False):
        """curve: both ends with CURVE keys, the prefill end's key admitted by the decode end."""
        self.w = w
        ipc = f"{ipc_dir}/ours{'-curve' if curve else ''}.sock" if ipc_dir else None
        keys = (CurveKeys.generate(), CurveKeys.generate()) if curve else (None, None)
        self.dec = ZmqKVManager(Role.DECODE, w.layout, tp=w.decode_tp, ipc_path=ipc, curve=keys[0])
        self.pre = ZmqKVManager(Role.PREFILL, w.layout, tp=w.prefill_tp, curve=keys[1])
        self.server_key = keys[0].public if curve else None
        self.dec.start()
        self.pre.start()
        if curve:
            self.dec.on_peers("decode", [node_pb2.Peer(node_id="prefill", kv_curve_key=keys[1].public.decode())])
        self.n = 0

    def run(self) -> float:
        self.n += 1
        tid, w = f"bench-{self.n}", self.w
        rx = self.dec.expect(tid, 1, list(range(w.num_blocks)), time.time() + 60, lambda layer, per_rank: None)
        tx = self.pre.sender(self.dec.endpoint, tid, 1, w.num_blocks, server_key=self.server_key)
        t0 = time.perf_counter()
        start = 0
        for group in w.groups:
            tx.send_layers(start, group)
            start += len(group)
        tx.finish(0)
        state = rx.wait(60)
        dt = time.perf_counter() - t0
        if state != TransferState.DONE or tx.wait(60) != TransferState.DONE:
            raise RuntimeError(f"transfer failed: {rx.error or tx.error}")
        return dt

    def close(self) -> None:
        self.pre.close()
        self.dec.close()


class Raw:
    """Bare pyzmq PUSH -> PULL of the same frames: no checks, no acks."""

    def __init__(self, w: Workload, ipc_dir: str | None, header_bytes: int):
        self.ctxs = zmq.Context(), zmq.Context()
        self.pull, self.push = self.ctxs[0].socket(zmq.PULL), self.ctxs[1].socket(zmq.PUSH)
        if ipc_dir:
            self.pull.bind(f"ipc://{ipc_dir}/raw.sock")
        else:
            self.pull.bind("tcp://127.0.0.1:0")
        self.push.connect(self.pull.getsockopt_string(zmq.LAST_ENDPOINT))
        self.messages = [[memoryview(t.view(torch.uint8).reshape(-1).numpy()) for t in msg] for msg in w.frames]
        self.messages.append([])  # like finish(): a header alone
        self.header = b"h" * header_bytes

    def run(self) -> float:
        done = threading.Event()

        def receive() -> None:
            for _ in self.messages:
                self.pull.recv_multipart(copy=False)
            done.set()

        rx = threading.Thread(target=receive)
        rx.start()
        t0 = time.perf_counter()
        for frames in self.messages:
            self.push.send_multipart([self.header, *frames], copy=False)
        done.wait()
        dt = time.perf_counter() - t0
        rx.join()
        return dt

    def close(self) -> None:
        self.push.close(linger=0)
        self.pull.close(linger=0)
        for ctx in self.ctxs:
            ctx.term()


class NoChecksum:
    """Diagnostic only: ours with the checksum replaced by a constant on both ends."""

    def __enter__(self):
        self.saved = pdserve.kv_transfer.base.header.checksum
        pdserve.kv_transfer.base.header.checksum = lambda frame: 0

    def __exit__(self, *exc) -> None:
        pdserve.kv_transfer.base.header.checksum = self.saved


def measure_curve(w: Workload, endpoint: str, runs: int, warmup: int) -> dict:
    """Ours with CURVE next to ours without, interleaved; medians."""
    with tempfile.TemporaryDirectory() as tmp:
        ipc_dir = tmp if endpoint == "ipc" else None
        plain, curve = Ours(w, ipc_dir), Ours(w, ipc_dir, curve=True)
        try:
            for _ in range(warmup):
                plain.run()
                curve.run()
            t_plain, t_curve = [], []
            for _ in range(runs):
                t_plain.append(plain.run())
                t_curve.append(curve.run())
        finally:
            plain.close()
            curve.close()
    s_plain, s_curve = statistics.median(t_plain), statistics.median(t_curve)
    gb = w.nbytes / 1e9
    return dict(case=w.case.name, endpoint=endpoint, bytes=w.nbytes, messages=len(w.groups) + 1,
                plain_seconds=s_plain, plain_gbps=gb / s_plain, curve_seconds=s_curve, curve_gbps=gb / s_curve,
                ratio=s_plain / s_curve)


def main_curve(args) -> None:
    cases = []
    for case in CASES:
        w = make_workload(case, args.tokens, args.block_size, args.layers_per_message, args.prefill_tp, args.decode_tp)
        for endpoint in args.endpoints:
            cases.append(measure_curve(w, endpoint, args.runs, args.warmup))
    print(f"{'case':<20} {'endpoint':<8} {'MiB':>6} {'plain GB/s':>10} {'CURVE GB/s':>10} {'ratio':>6}")
    for c in cases:
        print(f"{c['case']:<20} {c['endpoint']:<8} {c['bytes'] / 2**20:6.1f} {c['plain_gbps']:10.2f} "
              f"{c['curve_gbps']:10.2f} {c['ratio']:6.2f}")
    headline = next((c for c in cases if (c["case"], c["endpoint"]) == HEADLINE), cases[0])
    out = args.out if args.out != RESULTS / "kv_transfer_zmq.json" else RESULTS / "kv_transfer_zmq_curve.json"
    result = dict(
        benchmark="kv_transfer_zmq_curve", device=cpu_model(), date=datetime.datetime.now().astimezone().isoformat(),
        commit=commit(args.commit), ratio=round(headline["ratio"], 3), target=None,
        config=dict(transport="zmq", tokens=args.tokens, block_size=args.block_size,
                    layers_per_message=args.layers_per_message, prefill_tp=args.prefill_tp,
                    decode_tp=args.decode_tp, runs=args.runs, warmup=args.warmup, cpus=os.cpu_count(),
                    pyzmq=zmq.__version__, libzmq=zmq.zmq_version(),
                    headline=f"{headline['case']} over {headline['endpoint']}",
                    uncommitted_changes=uncommitted_changes()),
        cases=cases,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio (headline {result['config']['headline']}): CURVE / plain bandwidth {result['ratio']:.2f} -> {out}")


def checksum_gbps(nbytes: int = 64 << 20) -> float:
    buf = torch.randn(nbytes // 4).view(torch.uint8).numpy()
    t0 = time.perf_counter()
    for _ in range(3):
        pdserve.kv_transfer.base.header.checksum(buf)
    return 3 * nbytes / (time.perf_counter() - t0) / 1e9


def measure(w: Workload, endpoint: str, runs: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ipc_dir = tmp if endpoint == "ipc" else None
        ours, raw = Ours(w, ipc_dir), Raw(w, ipc_dir, header_bytes=300)
        try:
            for _ in range(warmup):
                ours.run()
                raw.run()
            t_ours, t_raw, t_nocheck = [], [], []
            cpu_ours, cpu_raw = 0.0, 0.0
            for _ in range(runs):  # interleaved, so drift hits all alike
                c0 = cpu_seconds()
                t_ours.append(ours.run())
                c1 = cpu_seconds()
                t_raw.append(raw.run())
                cpu_ours, cpu_raw = cpu_ours + c1 - c0, cpu_raw + cpu_seconds() - c1
                with NoChecksum():
                    t_nocheck.append(ours.run())
        finally:
            ours.close()
            raw.close()
    s_ours, s_raw, s_nocheck = (statistics.median(t) for t in (t_ours, t_raw, t_nocheck))
    gb = w.nbytes / 1e9
    return dict(case=w.case.name, endpoint=endpoint, bytes=w.nbytes, messages=len(w.groups) + 1,
                seconds=s_ours, gbps=gb / s_ours, raw_seconds=s_raw, raw_gbps=gb / s_raw, ratio=s_raw / s_ours,
                cpu_s_per_gb=cpu_ours / runs / gb, raw_cpu_s_per_gb=cpu_raw / runs / gb,
                diag_no_checksum_gbps=gb / s_nocheck, diag_no_checksum_ratio=s_raw / s_nocheck)


def cpu_seconds() -> float:
    """CPU time of this process (all threads, user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers-per-message", type=int, default=1)
    ap.add_argument("--prefill-tp", type=int, default=1)
    ap.add_argument("--decode-tp", type=int, default=1)
    ap.add_argument("--endpoints", nargs="+", choices=["tcp", "ipc"], default=["tcp", "ipc"])
    ap.add_argument("--runs", type=int, default=15, help="timed runs of each")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_transfer_zmq.json")
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--curve", action="store_true", help="measure CURVE on against off instead of ours against raw")
    ap.add_argument("--cases", nargs="+", default=None, help="only these cases (names as in CASES)")
    args = ap.parse_args()
    if args.cases:
        CASES[:] = [c for c in CASES if c.name in args.cases]
    if args.curve:
        main_curve(args)
        return

    cases = []
    for case in CASES:
        w = make_workload(case, args.tokens, args.block_size, args.layers_per_message, args.prefill_tp, args.decode_tp)
        for endpoint in args.endpoints:
            cases.append(measure(w, endpoint, args.runs, args.warmup))
    check_speed = checksum_gbps()

    print(f"{'case':<20} {'endpoint':<8} {'MiB':>6} {'msgs':>4} {'ours ms':>8} {'ours GB/s':>9} "
          f"{'raw GB/s':>8} {'ratio':>6} {'CPU s/GB ours':>13} {'raw':>5}   {'diag no-checksum GB/s':>16} {'ratio':>6}")
    for c in cases:
        print(f"{c['case']:<20} {c['endpoint']:<8} {c['bytes'] / 2**20:6.1f} {c['messages']:4d} "
              f"{c['seconds'] * 1e3:8.1f} {c['gbps']:9.2f} {c['raw_gbps']:8.2f} {c['ratio']:6.2f} "
              f"{c['cpu_s_per_gb']:13.2f} {c['raw_cpu_s_per_gb']:5.2f}   "
              f"{c['diag_no_checksum_gbps']:16.2f} {c['diag_no_checksum_ratio']:6.2f}")
    print(f"XXH3-64 on this CPU: {check_speed:.1f} GB/s (one core)")

    headline = next((c for c in cases if (c["case"], c["endpoint"]) == HEADLINE), cases[0])
    result = dict(
        benchmark="kv_transfer_zmq", device=cpu_model(), date=datetime.datetime.now().astimezone().isoformat(),
        commit=commit(args.commit), ratio=round(headline["ratio"], 3), target=0.8,
        config=dict(transport="zmq", tokens=args.tokens, block_size=args.block_size,
                    layers_per_message=args.layers_per_message, prefill_tp=args.prefill_tp,
                    decode_tp=args.decode_tp, runs=args.runs, warmup=args.warmup, cpus=os.cpu_count(),
                    python=platform.python_version(), torch=torch.__version__, pyzmq=zmq.__version__,
                    libzmq=zmq.zmq_version(), checksum_gbps=round(check_speed, 2), shapes=[asdict(c) for c in CASES],
                    headline=f"{HEADLINE[0]} over {HEADLINE[1]}", write="no-op",
                    uncommitted_changes=uncommitted_changes()),
        cases=cases,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio (headline {HEADLINE[0]}, {HEADLINE[1]}): {result['ratio']:.2f}  target 0.8  -> {args.out}")


if __name__ == "__main__":
    main()
