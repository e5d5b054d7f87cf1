"""KV transfer bandwidth: our transport next to the raw library moving the same frames.

    .venv/bin/python benchmarks/kv_transfer.py --transport zmq [--runs 21] [--endpoints tcp ipc]
    python3 benchmarks/kv_transfer.py --transport nccl [--commit HASH]   # two GPUs
    .venv/bin/python benchmarks/kv_transfer.py --transport nccl --cpu    # gloo smoke run, no result file

NCCL (see nccl_main below): RankKV between two processes (GPU 0 sends, GPU 1 receives),
model-shaped bf16 caches with shuffled block ids, against plain send/recv of the same
bytes as one tensor on the same pair group.

ZeroMQ:
For each case (a model-shaped KV of a prompt) and endpoint kind (tcp loopback, ipc),
ours = bytes / seconds from the first send_layers() to the receiver's DONE (all
layers checked with XXH3 and handed to write(), here a no-op); raw = the same
frames (same sizes, same number of messages, a header of the same size, copy=False)
through a bare pyzmq PUSH/PULL pair (one context per end, like ours), first send
to last message received. Runs alternate after a warm-up; the median of each is
reported, and ratio = ours / raw. Everything runs in this process, so both ends
share its CPUs. A diagnostic third column runs ours with the checksum stubbed out
(both ends), to show what integrity checking costs on this host; the transport
itself always checks."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # this file is named like the package it measures

import torch  # noqa: E402
import zmq  # noqa: E402

import pdserve.kv_transfer.base.header  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from pdserve.kv_transfer.base.conn import Role  # noqa: E402
from pdserve.kv_transfer.base.layout import KVLayout, unique_ranks  # noqa: E402
from pdserve.kv_transfer.base.status import TransferState  # noqa: E402
from pdserve.kv_transfer.zmq.manager import ZmqKVManager  # noqa: E402


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

    def __init__(self, w: Workload, ipc_dir: str | None):
        self.w = w
        ipc = f"{ipc_dir}/ours.sock" if ipc_dir else None
        self.dec = ZmqKVManager(Role.DECODE, w.layout, tp=w.decode_tp, ipc_path=ipc)
        self.pre = ZmqKVManager(Role.PREFILL, w.layout, tp=w.prefill_tp)
        self.dec.start()
        self.pre.start()
        self.n = 0

    def run(self) -> float:
        self.n += 1
        tid, w = f"bench-{self.n}", self.w
        rx = self.dec.expect(tid, 1, list(range(w.num_blocks)), time.time() + 60, lambda layer, per_rank: None)
        tx = self.pre.sender(self.dec.endpoint, tid, 1, w.num_blocks)
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


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", choices=["zmq", "nccl"], default="zmq")
    ap.add_argument("--tokens", type=int, default=2048, help="zmq: prompt tokens")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers-per-message", type=int, default=1, help="zmq")
    ap.add_argument("--prefill-tp", type=int, default=1, help="zmq")
    ap.add_argument("--decode-tp", type=int, default=1, help="zmq")
    ap.add_argument("--endpoints", nargs="+", choices=["tcp", "ipc"], default=["tcp", "ipc"], help="zmq")
    ap.add_argument("--runs", type=int, default=None, help="timed runs of each (zmq 15, nccl 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kv_transfer_zmq.json", help="zmq")
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--cpu", action="store_true", help="nccl: smoke run over gloo on CPU with tiny caches")
    ap.add_argument("--save", action="store_true", help="nccl --cpu: write the result file anyway")
    ap.add_argument("--min-message-mib", type=float, default=16,
                    help="nccl: RankKV's min_message_bytes (default: the nodes')")
    ap.add_argument("--cases", nargs="*", default=None, help="nccl: only the cases whose names start so")
    ap.add_argument("--max-ctas", type=int, default=0, help="nccl: RankKV's max_ctas (0: NCCL's choice)")
    ap.add_argument("--gather-programs", type=int, default=0,
                    help="nccl: cap on the fused kernels' grid (RankKV gather_programs; 0: a program per block row)")
    ap.add_argument("--min-ctas", type=int, default=0, help="nccl: RankKV's min_ctas (0: NCCL's choice)")
    ap.add_argument("--max-messages", type=int, default=None, help="nccl: RankKV's max_messages (default: its own)")
    ap.add_argument("--pin-cpus", default="",
                    help="nccl: 'S,R': pin the sender process to CPU S and the receiver's to CPU R (Linux)")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="nccl: the rank processes call gc.freeze() once set up (what is there stays out of GC passes)")
    ap.add_argument("--diag", action="store_true", help="nccl: also the split kind and the kernels' own times")
    ap.add_argument("--profile", default=None, help="nccl: profile one transfer of ours per case; traces here")
    ap.add_argument("--result-name", default="kv_transfer_nccl", help="nccl: result file name (a sweep's points)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # nccl: a rank process
    ap.add_argument("--store-port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dump-after", type=float, default=None, help="nccl: rank processes print their stacks "
                    "and exit after this many seconds (debugging a hang)")
    args = ap.parse_args()
    if args.runs is None:
        args.runs = 10 if args.transport == "nccl" else 15
    if args.transport == "nccl":
        nccl_worker(args) if args.worker is not None else nccl_main(args)
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
        commit=args.commit or git("rev-parse", "HEAD"), ratio=round(headline["ratio"], 3), target=0.8,
        config=dict(transport=args.transport, tokens=args.tokens, block_size=args.block_size,
                    layers_per_message=args.layers_per_message, prefill_tp=args.prefill_tp,
                    decode_tp=args.decode_tp, runs=args.runs, warmup=args.warmup, cpus=os.cpu_count(),
                    python=platform.python_version(), torch=torch.__version__, pyzmq=zmq.__version__,
                    libzmq=zmq.zmq_version(), checksum_gbps=round(check_speed, 2), shapes=[asdict(c) for c in CASES],
                    headline=f"{HEADLINE[0]} over {HEADLINE[1]}", write="no-op",
                    uncommitted_changes=bool(git("status", "--porcelain", "--", "kv_transfer", "benchmarks"))),
        cases=cases,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio (headline {HEADLINE[0]}, {HEADLINE[1]}): {result['ratio']:.2f}  target 0.8  -> {args.out}")


# NCCL: RankKV between two rank processes against raw send/recv on the same pair group


@dataclass(frozen=True)
class NcclCase:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens: int


NCCL_CASES = [NcclCase("llama-3.1-8b 4K", 32, 8, 128, 4096), NcclCase("llama-3.2-1b 2K", 16, 8, 64, 2048)]
NCCL_HEADLINE = "llama-3.1-8b 4K"
SMOKE_CASES = [NcclCase("smoke 4L", 4, 2, 16, 256), NcclCase("smoke 3L", 3, 2, 8, 64)]


def nccl_cases(args) -> list[NcclCase]:
    cases = SMOKE_CASES if args.cpu else NCCL_CASES
    return [c for c in cases if not args.cases or any(c.name.startswith(p) for p in args.cases)]


def nccl_main(args) -> None:
    """Serve the rendezvous store, run the two rank processes, report the receiver's timings.
    Ours = bytes / (the receiver's poll() reporting the key ok - the sender entering send());
    raw = bytes / (the receive completed - the sender entering its send), one message of
    the same bytes, through torch's send and through a bare ncclSend (GPU; the faster is
    the reference). Every receive is posted before a barrier on the store, after which the
    sender spins until an agreed start instant (_start_together) and starts. Runs
    alternate; medians are reported. Times are CLOCK_MONOTONIC (time.perf_counter), one
    clock for every process of the host."""
    from pdserve.kv_transfer.nccl.store import serve_store
    if not args.cpu and torch.cuda.device_count() < 2:
        sys.exit("--transport nccl needs 2 GPUs (or --cpu for a gloo smoke run)")
    cases = nccl_cases(args)
    store, port = serve_store()
    flags = ["--transport", "nccl", "--store-port", str(port), "--runs", str(args.runs), "--warmup", str(args.warmup),
             "--block-size", str(args.block_size), "--min-message-mib", str(args.min_message_mib)]
    flags += ["--cpu"] if args.cpu else []
    flags += ["--cases", *args.cases] if args.cases else []
    flags += ["--dump-after", str(args.dump_after)] if args.dump_after else []
    flags += ["--max-ctas", str(args.max_ctas), "--gather-programs", str(args.gather_programs),
              "--min-ctas", str(args.min_ctas)]
    flags += ["--max-messages", str(args.max_messages)] if args.max_messages else []
    flags += ["--diag"] if args.diag else []
    flags += ["--gc-freeze"] if args.gc_freeze else []
    flags += ["--pin-cpus", args.pin_cpus] if args.pin_cpus else []
    flags += ["--profile", args.profile] if args.profile else []
    env = {"CUDA_MODULE_LOADING": "EAGER", **os.environ}  # see kv_transfer/nccl/rank.py: no lazy kernel loading
    procs = [subprocess.Popen([sys.executable, __file__, *flags, "--worker", str(i)], stdout=subprocess.PIPE,
                              text=True, env=env) for i in (0, 1)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            for q in procs:
                q.kill()
            sys.exit(f"a rank process failed (exit {p.returncode})")
        outs.append(out)
    del store
    rows = []
    senders = {r["case"]: r["sender"] for r in map(json.loads, outs[0].splitlines())}
    for line in outs[1].splitlines():
        r = json.loads(line)
        ours, raw_torch = statistics.median(r["ours"]), statistics.median(r["raw"])
        raw_nccl = statistics.median(r["raw_nccl"]) if "raw_nccl" in r else None
        raw = min(t for t in (raw_torch, raw_nccl) if t is not None)  # the faster is the limit
        row = dict(case=r["case"], bytes=r["bytes"], messages=r["messages"], ours_ms=round(ours * 1e3, 4),
                   raw_ms=round(raw * 1e3, 4), ours_gbps=round(r["bytes"] / ours / 1e9, 2),
                   raw_gbps=round(r["bytes"] / raw / 1e9, 2), ratio=round(raw / ours, 4),
                   raw_torch_ms=round(raw_torch * 1e3, 4), ratio_vs_raw_torch=round(raw_torch / ours, 4),
                   ours_runs_ms=[round(t * 1e3, 4) for t in r["ours"]],
                   raw_torch_runs_ms=[round(t * 1e3, 4) for t in r["raw"]])
        if raw_nccl is not None:
            row.update(raw_nccl_ms=round(raw_nccl * 1e3, 4), ratio_vs_raw_nccl=round(raw_nccl / ours, 4),
                       raw_nccl_runs_ms=[round(t * 1e3, 4) for t in r["raw_nccl"]])
        if "split" in r:  # --diag
            sender = senders.get(r["case"]) or {}
            row.update(split_ms=round(statistics.median(r["split"]) * 1e3, 4), kernels_ms=r.get("kernels_ms"),
                       host_us=r.get("host_us"), profile_receiver=r.get("profile"),
                       sender={k: v for k, v in sender.items() if k != "trace"})
            if "trace" in r and "trace" in sender:
                for kind in r["trace"]:
                    name = "timeline_us" if kind == "ours" else f"timeline_us_{kind}"
                    row[name] = _timeline(sender["trace"][kind], r["trace"][kind])
        rows.append(row)
    print(f"{'case':<18} {'MiB':>7} {'msgs':>4} {'ours ms':>8} {'ours GB/s':>9} {'raw ms':>7} {'raw GB/s':>8} "
          f"{'ratio':>6}  (raw: {'one message on our gloo group' if args.cpu else 'the faster of torch send, bare ncclSend'})")
    for c in rows:
        print(f"{c['case']:<18} {c['bytes'] / 2**20:7.1f} {c['messages']:4d} {c['ours_ms']:8.3f} {c['ours_gbps']:9.1f} "
              f"{c['raw_ms']:7.3f} {c['raw_gbps']:8.1f} {c['ratio']:6.3f}")
        print(f"  raw through torch's send {c['raw_torch_ms']:.3f} ms (ratio {c['ratio_vs_raw_torch']:.3f})"
              + (f"; bare ncclSend {c['raw_nccl_ms']:.3f} ms (ratio {c['ratio_vs_raw_nccl']:.3f})"
                 if "raw_nccl_ms" in c else ""))
        if "split_ms" in c:
            print(f"  diag: split (same messages, pre-gathered) {c['split_ms']:.3f} ms; kernels alone (ms) "
                  f"receiver {c['kernels_ms']} sender {(c['sender'] or {}).get('kernels_ms')}")
            print(f"  diag: host costs (us per call) {c['host_us']}")
            for kind in [k for k in c if k.startswith("timeline_us")]:
                print(f"  diag: {kind}")
                for name, us in c[kind]:
                    print(f"    {us:9.1f} us  {name}")
    headline = next((c for c in rows if c["case"] == NCCL_HEADLINE), rows[0])
    print(f"ratio (headline {headline['case']}): {headline['ratio']:.3f}  target 0.85")
    if args.cpu and not args.save:
        return
    from pdserve.kv_transfer.nccl.verify import MAX_MESSAGES
    max_messages = args.max_messages or MAX_MESSAGES
    config = dict(transport="nccl", backend="gloo" if args.cpu else "nccl", dtype="float32" if args.cpu else "bfloat16",
                  block_size=args.block_size, block_ids="shuffled", prefill_tp=1, decode_tp=1, runs=args.runs,
                  warmup=args.warmup, min_message_bytes=int(args.min_message_mib * 2**20), headline=NCCL_HEADLINE,
                  gc_freeze=args.gc_freeze or None, pin_cpus=args.pin_cpus or None, max_ctas=args.max_ctas or None, min_ctas=args.min_ctas or None, max_messages=max_messages,
                  gather_programs=args.gather_programs or None,
                  raw="the faster (median) of one message through torch's ProcessGroupNCCL (NCCL's own settings) "
                      "and one through a bare ncclSend/ncclRecv on our pair's communicator",
                  shapes=[asdict(c) for c in cases],
                  devices=[torch.cuda.get_device_name(i) for i in (0, 1)] if not args.cpu else ["cpu", "cpu"],
                  nccl=".".join(map(str, torch.cuda.nccl.version())) if not args.cpu else None,
                  timing="send() entered -> receiver's poll() ok; raw: send entered -> receive completed",
                  uncommitted_changes=bool(git("status", "--porcelain", "--", "kv_transfer", "benchmarks"))
                  if not args.commit else None)
    path = write_result(args.result_name, "kv_transfer_nccl", headline["ratio"], 0.85, config, args.commit,
                        cases=rows)
    print(f"-> {path}")


def nccl_worker(args) -> None:
    """One rank process: index 0 sends from GPU 0, 1 receives on GPU 1 (CPU with --cpu).
    Per run: ours (RankKV); raw, one message of the same bytes through torch's
    ProcessGroupNCCL (a group of its own, NCCL's own settings); raw_nccl, that one message
    through a bare ncclSend/ncclRecv on our pair's communicator (nccl_lib, the least a
    send can cost the host); with --diag, split: the same messages as ours, gathered
    beforehand, through bare sends on our pair's communicator (the cost of cutting the KV
    into messages apart from gathering, checking and scattering). On CPU, raw and split
    go through our pair's gloo group."""
    from pdserve.engine.kv_cache import KVCache
    from pdserve.kv_transfer.nccl.rank import RankKV
    from pdserve.kv_transfer.nccl.verify import layer_groups
    from pdserve.kv_transfer.nccl.store import connect_store
    index, cuda = args.worker, not args.cpu
    if args.pin_cpus:
        os.sched_setaffinity(0, {int(args.pin_cpus.split(",")[index])})
    if args.dump_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.dump_after, exit=True)
    device = torch.device("cuda", index) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    store = connect_store("127.0.0.1", args.store_port, 300)
    min_message = int(args.min_message_mib * 2**20)
    kinds = ("ours", "raw", "raw_nccl") if cuda else ("ours", "raw")
    kinds += ("split",) if args.diag else ()
    for ci, case in enumerate(nccl_cases(args)):
        bs, heads, layers = args.block_size, case.num_kv_heads, case.num_layers
        nb = -(-case.tokens // bs)
        kv = KVCache(layers, 2 * nb, bs, heads, case.head_dim, dtype, device)
        blocks = torch.randperm(2 * nb, generator=torch.Generator().manual_seed(index))[:nb].tolist()  # shuffled
        nbytes = 2 * layers * nb * bs * heads * case.head_dim * kv.k.element_size()
        raw = torch.empty(nbytes // kv.k.element_size(), dtype=dtype, device=device)
        if index == 0:
            for t in (kv.k, kv.v, raw):
                t.normal_()
        tuning = dict(max_ctas=args.max_ctas, min_ctas=args.min_ctas, gather_programs=args.gather_programs)
        if args.max_messages:
            tuning["max_messages"] = args.max_messages
        rank = RankKV(kv, device, timeout_s=120, min_message_bytes=min_message, **tuning)
        pair = f"bench{ci}"
        rank.open_pair(pair, "127.0.0.1", args.store_port, index)
        print(f"rank {index}: {case.name}: pair open", file=sys.stderr, flush=True)
        ours_link = _Link(rank.link(pair), index, device)
        wires = {"raw": (_Link(_torch_nccl_group(store, f"raw{ci}", index, device), index, device) if cuda
                         else ours_link, [raw]),
                 "raw_nccl": (ours_link, [raw])}
        groups = layer_groups(layers, nbytes // layers, min_message, rank.max_messages)
        if args.diag:
            wires["split"] = (ours_link, _split_buffers(rank, blocks, groups, heads, index))
        times = {k: [] for k in kinds}
        if args.gc_freeze:
            import gc
            gc.collect()
            gc.freeze()
        for run in range(args.warmup + args.runs):
            for kind in kinds:
                tag = f"{ci}/{run}/{kind}"
                key = len(kinds) * run + kinds.index(kind)
                t = _one_transfer(kind, index, rank, store, tag, key, blocks, pair, heads, layers, wires.get(kind))
                if index == 1 and run >= args.warmup:
                    times[kind].append(t)
                if index == 1 and run == 0:
                    print(f"rank {index}: {case.name}: first {kind} transfer done", file=sys.stderr, flush=True)
        extra = {}
        if args.diag and cuda:
            extra["kernels_ms"] = _kernel_times(rank, blocks, groups, heads)
            extra["host_us"] = _host_costs(rank, blocks, groups, heads)
            extra["trace"] = _traced(index, rank, store, ci, blocks, pair, heads, layers, wires)
        if args.profile and cuda:
            extra["profile"] = _profile_one(args, index, rank, store, ci, blocks, pair, heads, layers)
        if index == 1:
            print(json.dumps(dict(case=case.name, bytes=nbytes, messages=len(groups) + 1, **times, **extra)), flush=True)
        elif extra:
            print(json.dumps(dict(case=case.name, sender=extra)), flush=True)
        rank.close()
        del kv, raw, rank, wires, ours_link
        if cuda:
            torch.cuda.empty_cache()


class _Link:
    """Plain sends or receives of whole buffers, in order: on a torch process group
    (its works) or on a nccl_lib.Comm (on a stream of our own, an event after the last)."""

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
            _until_completed(w, self.cuda)
            if trace and self.index == 1:
                trace.host(f"received {i}")
        self.works = []


def _torch_nccl_group(store, prefix: str, index: int, device: torch.device):
    """A 2-rank ProcessGroupNCCL of torch with NCCL's own settings, connected by one tiny message."""
    import torch.distributed as dist
    from torch.distributed import PrefixStore
    group = dist.ProcessGroupNCCL(PrefixStore(f"{prefix}/", store), index, 2, dist.ProcessGroupNCCL.Options())
    t = torch.zeros(1, device=device)
    (group.send([t], 1, 0) if index == 0 else group.recv([t], 0, 0)).wait()
    torch.cuda.synchronize(device)
    return group


def _one_transfer(kind, index, rank, store, tag, key, blocks, pair, heads, layers, wire) -> float | None:
    """One transfer of `kind`: the receiver posts before the start, the sender issues after
    it (_start_together); the receiver returns its seconds from the start to its own end."""
    def issue() -> None:
        if kind == "ours":
            if index == 0:
                rank.send(key, blocks, [(pair, 0, heads)])
            else:
                rank.recv(key, blocks, [(pair, 0, heads)], layers)
        else:
            wire[0].issue(wire[1])

    if index == 0:
        t0 = _start_together(store, tag, index)
        issue()
    else:
        issue()
        t0 = _start_together(store, tag, index)
    if kind == "ours":
        _until_ended(rank, key)
    else:
        wire[0].wait()
    return None if index == 0 else time.perf_counter() - t0


def _split_buffers(rank, blocks, groups, heads, index) -> list[torch.Tensor]:
    """--diag's split kind: ours's messages, gathered once beforehand, and a tail of the same size."""
    idx = torch.tensor(blocks, dtype=torch.long, device=rank.device)
    bufs = [rank.bufs.gather(idx, l0, l1, 0, heads) for l0, l1 in groups]
    if index == 1:
        bufs = [torch.empty_like(b) for b in bufs]
    return [*bufs, torch.zeros(3 + rank.kv.num_layers, dtype=torch.int64, device=rank.device)]


def _kernel_times(rank, blocks, groups, heads) -> dict:
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


def _host_costs(rank, blocks, groups, heads) -> dict:
    """Host time of the steps a send issues, microseconds per call (median of 5 rounds of 20)."""
    idx = torch.tensor(blocks, dtype=torch.long, device=rank.device)
    (l0, l1), nb = groups[0], len(blocks)
    buf = rank.bufs.gather(idx, l0, l1, 0, heads)
    rows = torch.empty((rank.kv.num_layers, 2 * nb), dtype=torch.int64, device=rank.device)
    event = torch.cuda.Event()
    ids = torch.tensor(blocks, dtype=torch.long)
    import array

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


def _traced(index, rank, store, ci, blocks, pair, heads, layers, wires, runs: int = 7) -> dict:
    """Transfers with RankKV's Trace on, both ends leaving a barrier together as in the timed
    runs: per kind (ours and the plain ones), per run, this rank's marks (label, host
    seconds). For the plain kinds the sender marks its entry and each send issued, the
    receiver the receives completed: the host cost of cold send calls beside ours."""
    from pdserve.kv_transfer.nccl.trace import Trace
    rank.gpu.trace, out = Trace(rank.device), {kind: [] for kind in ("ours", *wires)}
    trace = rank.trace
    for run in range(runs):
        for kind in out:
            key, tag = 2 * 10**6 + len(out) * run + len(out[kind]), f"trace/{ci}/{run}/{kind}"
            link, bufs = wires.get(kind, (None, None))
            if index == 0:
                _start_together(store, tag, index)
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
                _start_together(store, tag, index)
            if kind == "ours":
                _until_ended(rank, key)
            else:
                link.wait(trace)
            out[kind].append(trace.report())
    rank.gpu.trace = None
    return out


def _timeline(sender: list, receiver: list) -> list:
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


def _profile_one(args, index, rank, store, ci, blocks, pair, heads, layers) -> dict:
    """One more transfer of ours under torch.profiler: its GPU kernels and copies, per
    stream, in microseconds from the first of them (a compact timeline of this rank)."""
    from torch.profiler import ProfilerActivity, profile
    key = 10**6 + ci
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if index == 0:
            _barrier(store, f"profile/{ci}")
            rank.send(key, blocks, [(pair, 0, heads)])
        else:
            rank.recv(key, blocks, [(pair, 0, heads)], layers)
            _barrier(store, f"profile/{ci}")
        _until_ended(rank, key)
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


def _start_together(store, tag: str, index: int, lead_s: float = 0.002) -> float:
    """Both rank processes meet at the barrier; the sender then names a start instant
    lead_s ahead on the host's monotonic clock and both return it, the sender by spinning
    until it comes. The sender starts from a running core rather than from waking up after
    a store round trip (on these hosts that alone cost ours, dozens of Python and CUDA
    calls, a few hundred microseconds, and raw one call), and both ends share one t0."""
    _barrier(store, tag)
    if index == 0:
        t0 = time.perf_counter() + lead_s
        store.set(f"t0/{tag}", repr(t0))
        while time.perf_counter() < t0:
            pass
        return t0
    return float(store.get(f"t0/{tag}"))


def _barrier(store, tag: str) -> None:
    """Both rank processes leave together (to within a store round trip)."""
    store.add(f"barrier/{tag}", 1)
    while store.add(f"barrier/{tag}", 0) < 2:
        pass


def _until_ended(rank, key: int) -> None:
    while True:
        done = rank.poll()
        if key in done:
            ok, error = done[key]
            if not ok:
                raise RuntimeError(f"transfer {key} failed: {error}")
            return
        if not rank.cuda:
            time.sleep(0)  # gloo: let the thread waiting for the works take the GIL


def _until_completed(work, cuda: bool) -> None:
    if cuda:
        while not work.is_completed():
            pass
    work.wait()  # gloo: its works complete only through wait()


if __name__ == "__main__":
    main()
