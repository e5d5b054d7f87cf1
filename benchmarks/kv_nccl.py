"""NCCL KV transfer bandwidth: RankKV between two rank processes (GPU 0 sends, GPU 1
receives), model-shaped bf16 caches with shuffled block ids, against one message of the
same bytes through torch's send and through a bare ncclSend on the same pair.

    python benchmarks/kv_nccl.py [--commit HASH] [--diag]   # two GPUs -> results/kv_transfer_nccl.json
    python benchmarks/kv_nccl.py --cpu                      # gloo smoke run on CPU, no result file"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from common import uncommitted_changes, write_result
from kv_nccl_diag import host_costs, kernel_times, profile_one, split_buffers, timeline, traced
from kv_nccl_link import Link, start_together, torch_nccl_group, until_ended


@dataclass(frozen=True)
class NcclCase:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens: int


CASES = [NcclCase("llama-3.1-8b 4K", 32, 8, 128, 4096), NcclCase("llama-3.2-1b 2K", 16, 8, 64, 2048)]
HEADLINE = "llama-3.1-8b 4K"
SMOKE_CASES = [NcclCase("smoke 4L", 4, 2, 16, 256), NcclCase("smoke 3L", 3, 2, 8, 64)]


def selected_cases(args) -> list[NcclCase]:
    cases = SMOKE_CASES if args.cpu else CASES
    return [c for c in cases if not args.cases or any(c.name.startswith(p) for p in args.cases)]


def run_pair(args) -> None:
    """Serve the rendezvous store, run the two rank processes, report the receiver's timings.
    Ours = bytes / (the receiver's poll() reporting the key ok - the sender entering send());
    raw = bytes / (the receive completed - the sender entering its send), one message of
    the same bytes, through torch's send and through a bare ncclSend (GPU; the faster is
    the reference). Every receive is posted before a barrier on the store, after which the
    sender spins until an agreed start instant (start_together) and starts. Runs
    alternate; medians are reported. Times are CLOCK_MONOTONIC (time.perf_counter), one
    clock for every process of the host."""
    from pdserve.kv_transfer.nccl.store import serve_store
    if not args.cpu and torch.cuda.device_count() < 2:
        sys.exit("kv_nccl.py needs 2 GPUs (or --cpu for a gloo smoke run)")
    cases = selected_cases(args)
    store, port = serve_store()
    flags = ["--store-port", str(port), "--runs", str(args.runs), "--warmup", str(args.warmup),
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
                    row[name] = timeline(sender["trace"][kind], r["trace"][kind])
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
    headline = next((c for c in rows if c["case"] == HEADLINE), rows[0])
    print(f"ratio (headline {headline['case']}): {headline['ratio']:.3f}  target 0.85")
    if args.cpu and not args.save:
        return
    from pdserve.kv_transfer.nccl.verify import MAX_MESSAGES
    max_messages = args.max_messages or MAX_MESSAGES
    config = dict(transport="nccl", backend="gloo" if args.cpu else "nccl", dtype="float32" if args.cpu else "bfloat16",
                  block_size=args.block_size, block_ids="shuffled", prefill_tp=1, decode_tp=1, runs=args.runs,
                  warmup=args.warmup, min_message_bytes=int(args.min_message_mib * 2**20), headline=HEADLINE,
                  gc_freeze=args.gc_freeze or None, pin_cpus=args.pin_cpus or None, max_ctas=args.max_ctas or None,
                  min_ctas=args.min_ctas or None, max_messages=max_messages,
                  gather_programs=args.gather_programs or None,
                  raw="the faster (median) of one message through torch's ProcessGroupNCCL (NCCL's own settings) "
                      "and one through a bare ncclSend/ncclRecv on our pair's communicator",
                  shapes=[asdict(c) for c in cases],
                  devices=[torch.cuda.get_device_name(i) for i in (0, 1)] if not args.cpu else ["cpu", "cpu"],
                  nccl=".".join(map(str, torch.cuda.nccl.version())) if not args.cpu else None,
                  timing="send() entered -> receiver's poll() ok; raw: send entered -> receive completed",
                  uncommitted_changes=uncommitted_changes() if not args.commit else None)
    path = write_result(args.result_name, "kv_transfer_nccl", headline["ratio"], 0.85, config, args.commit,
                        cases=rows)
    print(f"-> {path}")


def rank_process(args) -> None:
    """One rank process: index 0 sends from GPU 0, 1 receives on GPU 1 (CPU with --cpu).
    Per run: ours (RankKV); raw, one message of the same bytes through torch's
    ProcessGroupNCCL (a group of its own, NCCL's own settings); raw_nccl, that one message
    through a bare ncclSend/ncclRecv on our pair's communicator (kv_transfer/nccl/lib.py, the least a
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
    for ci, case in enumerate(selected_cases(args)):
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
        ours_link = Link(rank.link(pair), index, device)
        wires = {"raw": (Link(torch_nccl_group(store, f"raw{ci}", index, device), index, device) if cuda
                         else ours_link, [raw]),
                 "raw_nccl": (ours_link, [raw])}
        groups = layer_groups(layers, nbytes // layers, min_message, rank.max_messages)
        if args.diag:
            wires["split"] = (ours_link, split_buffers(rank, blocks, groups, heads, index))
        times = {k: [] for k in kinds}
        if args.gc_freeze:
            import gc
            gc.collect()
            gc.freeze()
        for run in range(args.warmup + args.runs):
            for kind in kinds:
                tag = f"{ci}/{run}/{kind}"
                key = len(kinds) * run + kinds.index(kind)
                t = one_transfer(kind, index, rank, store, tag, key, blocks, pair, heads, layers, wires.get(kind))
                if index == 1 and run >= args.warmup:
                    times[kind].append(t)
                if index == 1 and run == 0:
                    print(f"rank {index}: {case.name}: first {kind} transfer done", file=sys.stderr, flush=True)
        extra = {}
        if args.diag and cuda:
            extra["kernels_ms"] = kernel_times(rank, blocks, groups, heads)
            extra["host_us"] = host_costs(rank, blocks, groups, heads)
            extra["trace"] = traced(index, rank, store, ci, blocks, pair, heads, layers, wires)
        if args.profile and cuda:
            extra["profile"] = profile_one(args, index, rank, store, ci, blocks, pair, heads, layers)
        if index == 1:
            print(json.dumps(dict(case=case.name, bytes=nbytes, messages=len(groups) + 1, **times, **extra)), flush=True)
        elif extra:
            print(json.dumps(dict(case=case.name, sender=extra)), flush=True)
        rank.close()
        del kv, raw, rank, wires, ours_link
        if cuda:
            torch.cuda.empty_cache()


def one_transfer(kind, index, rank, store, tag, key, blocks, pair, heads, layers, wire) -> float | None:
    """One transfer of `kind`: the receiver posts before the start, the sender issues after
    it (start_together); the receiver returns its seconds from the start to its own end."""
    def issue() -> None:
        if kind == "ours":
            if index == 0:
                rank.send(key, blocks, [(pair, 0, heads)])
            else:
                rank.recv(key, blocks, [(pair, 0, heads)], layers)
        else:
            wire[0].issue(wire[1])

    if index == 0:
        t0 = start_together(store, tag, index)
        issue()
    else:
        issue()
        t0 = start_together(store, tag, index)
    if kind == "ours":
        until_ended(rank, key)
    else:
        wire[0].wait()
    return None if index == 0 else time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=10, help="timed runs of each kind")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--commit", default=None, help="commit measured, where the tree has no .git")
    ap.add_argument("--cpu", action="store_true", help="smoke run over gloo on CPU with tiny caches")
    ap.add_argument("--save", action="store_true", help="--cpu: write the result file anyway")
    ap.add_argument("--min-message-mib", type=float, default=16, help="RankKV's min_message_bytes (default: the nodes')")
    ap.add_argument("--cases", nargs="*", default=None, help="only the cases whose names start so")
    ap.add_argument("--max-ctas", type=int, default=0, help="RankKV's max_ctas (0: NCCL's choice)")
    ap.add_argument("--min-ctas", type=int, default=0, help="RankKV's min_ctas (0: NCCL's choice)")
    ap.add_argument("--gather-programs", type=int, default=0,
                    help="cap on the fused kernels' grid (RankKV gather_programs; 0: a program per block row)")
    ap.add_argument("--max-messages", type=int, default=None, help="RankKV's max_messages (default: its own)")
    ap.add_argument("--pin-cpus", default="", help="'S,R': pin the sender process to CPU S and the receiver's to CPU R")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="the rank processes call gc.freeze() once set up (what is there stays out of GC passes)")
    ap.add_argument("--diag", action="store_true", help="also the split kind, the kernels' own times and a timeline")
    ap.add_argument("--profile", default=None, help="profile one transfer of ours per case; traces here")
    ap.add_argument("--result-name", default="kv_transfer_nccl", help="result file name under results/")
    ap.add_argument("--dump-after", type=float, default=None,
                    help="rank processes print their stacks and exit after this many seconds (debugging a hang)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # a rank process
    ap.add_argument("--store-port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rank_process(args) if args.worker is not None else run_pair(args)


if __name__ == "__main__":
    main()
