"""Where a prefill step's time goes: the host's time to queue it against the device's, per
process, for eager steps and for replays of the prefill CUDA graphs.

    python benchmarks/prefill_probe.py [--shape llama-3.2-1b] [--tokens 2048] [--procs 6] [--steps 30]

Each of --procs fresh processes (eager and graph in turn; CUDA_MODULE_LOADING EAGER and
LAZY alternating by pairs, as the NCCL nodes and the other nodes run) starts an engine
with random weights of the shape and runs one prompt of --tokens tokens through
ModelRunner.execute, --steps times in each of these ways:

- served: as a node runs it (the device idle when the step starts), host time until
  execute() returned, device time between events around it, and the whole step up to
  the logits on the host;
- host alone: the same behind a ~50 ms sleep kernel, so that the host queues the whole
  step before the device reaches it: host time is then the host's own cost (a sync
  inside the step would show as tens of ms), device time the device's own;
- hooked (eager only): served, with a forward hook recording an event after each layer,
  as an eager step with KV sends does.

Also, once per process: the step under torch's sync debug mode (any synchronizing call
inside it is listed) and a cProfile of one host-alone step (top functions by own time).
Prints one JSON line per process and a summary; writes benchmarks/results/prefill_probe.json
with ratio = the graph's served step / the eager served step (median over processes)."""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import write_config_folder, write_result


def child(a: argparse.Namespace) -> None:
    import torch

    from pdserve.common.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.model_runner import StepPlan

    folder = write_config_folder(a.shape, Path(tempfile.mkdtemp()) / "model")
    n, bs = a.tokens, 16
    cfg = EngineConfig(model=str(folder), device="cuda", dtype="bfloat16", load_format="dummy",
                       enforce_eager=a.mode == "eager",
                       max_num_seqs=8, max_num_batched_tokens=n, max_model_len=max(4096, n),
                       gpu_memory_utilization=0.5)
    engine = LLMEngine(cfg).start()
    runner = engine.executor.runner
    g = torch.Generator().manual_seed(0)
    blocks = -(-n // bs)
    table = torch.randperm(runner.num_blocks, generator=g)[:blocks]
    pos = torch.arange(n)
    plan = StepPlan(torch.randint(0, runner.spec.vocab_size, (n,), generator=g), pos,
                    table[pos // bs] * bs + pos % bs, torch.tensor([n]), torch.tensor([n]), table.view(1, -1),
                    torch.tensor([n - 1]))
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def step(sleep_cycles: int = 0) -> tuple[float, float, float, float]:
        torch.cuda.synchronize()
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        events[0].record()
        logits = runner.execute(plan)
        t1 = time.perf_counter()
        c1 = time.thread_time()
        events[1].record()
        logits.argmax(-1).tolist()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, events[0].elapsed_time(events[1]), (t2 - t0) * 1e3, (c1 - c0) * 1e3

    for _ in range(3):
        step()
    # ~50 ms of device time at the H200's clock, whatever it is: calibrate
    torch.cuda.synchronize()
    events[0].record()
    torch.cuda._sleep(10_000_000)
    events[1].record()
    torch.cuda.synchronize()
    cycles = int(10_000_000 * 50.0 / max(events[0].elapsed_time(events[1]), 1e-3))

    out: dict = dict(pid=os.getpid(), mode=a.mode, loading=os.environ.get("CUDA_MODULE_LOADING", "default"),
                     device=torch.cuda.get_device_name(0), num_blocks=runner.num_blocks)
    for name, sleep in (("served", 0), ("host_alone", cycles)):
        rows = [step(sleep) for _ in range(a.steps)]
        out[name] = {k: round(statistics.median(r[i] for r in rows), 3) for i, k in
                     enumerate(("host_ms", "gpu_ms", "step_ms", "host_cpu_ms"))}
        out[name]["series"] = [[round(x, 2) for x in r] for r in rows]
    hooked = [torch.cuda.Event() for _ in runner.model.layers] if a.mode == "eager" else []
    handles = [layer.register_forward_hook(lambda m, i, o, e=e: e.record()) for layer, e in
               zip(runner.model.layers, hooked)]
    rows = [step() for _ in range(a.steps)]
    for h in handles:
        h.remove()
    out["hooked" if hooked else "served_again"] = {k: round(statistics.median(r[i] for r in rows), 3) for i, k in
                     enumerate(("host_ms", "gpu_ms", "step_ms", "host_cpu_ms"))}

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = runner.execute(plan)
    torch.cuda.set_sync_debug_mode(0)
    logits.argmax(-1).tolist()
    out["syncs"] = [str(w.message)[:160] for w in caught][:10]
    out["sync_count"] = len(caught)

    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    prof = cProfile.Profile()
    prof.enable()
    logits = runner.execute(plan)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    out["profile"] = s.getvalue().splitlines()[-26:]
    print("PROBE " + json.dumps(out), flush=True)
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--procs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", choices=["eager", "graph"], default="eager")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default="prefill_probe")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    procs = []
    for i in range(a.procs):
        mode = ("eager", "graph")[i % 2]
        env = dict(os.environ, CUDA_MODULE_LOADING="EAGER" if i // 2 % 2 == 0 else "LAZY")
        cmd = [sys.executable, __file__, "--child", "--shape", a.shape, "--tokens", str(a.tokens),
               "--steps", str(a.steps), "--mode", mode]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE ")), None)
        if line is None:
            print(r.stdout[-2000:], r.stderr[-4000:], flush=True)
            continue
        row = json.loads(line[6:])
        procs.append(row)
        again = row.get("hooked") or row["served_again"]
        print(f"[{i}] {row['mode']:5s} {row['loading']:6s} served host {row['served']['host_ms']:6.2f} gpu {row['served']['gpu_ms']:6.2f}"
              f" step {row['served']['step_ms']:6.2f} cpu {row['served']['host_cpu_ms']:6.2f} | alone host {row['host_alone']['host_ms']:6.2f}"
              f" cpu {row['host_alone']['host_cpu_ms']:6.2f} gpu {row['host_alone']['gpu_ms']:6.2f} | hooked/again step {again['step_ms']:6.2f}"
              f" | syncs {row['sync_count']}", flush=True)
        if i < 2:
            print("\n".join(row["profile"]), "\n".join(row["syncs"]), sep="\n", flush=True)
    if not procs:
        sys.exit("no process finished")
    summary = {}
    for mode in ("eager", "graph"):
        rows = [p for p in procs if p["mode"] == mode]
        if not rows:
            continue
        med = lambda key, part: round(statistics.median(p[part][key] for p in rows), 3)  # noqa: E731
        summary[mode] = dict(host_alone_ms=med("host_ms", "host_alone"), device_alone_ms=med("gpu_ms", "host_alone"),
                             served_step_ms=med("step_ms", "served"), served_host_cpu_ms=med("host_cpu_ms", "served"),
                             processes=len(rows))
        m = summary[mode]
        m["host_over_device"] = round(m["host_alone_ms"] / m["device_alone_ms"], 4)
        print(f"{mode:5s} median over {len(rows)} processes: host alone {m['host_alone_ms']:.2f} ms, device alone "
              f"{m['device_alone_ms']:.2f} ms (host / device {m['host_over_device']:.3f}), served step "
              f"{m['served_step_ms']:.2f} ms")
    if len(summary) < 2:
        sys.exit("a mode had no process finish")
    ratio = summary["graph"]["served_step_ms"] / summary["eager"]["served_step_ms"]
    print(f"served prefill step, graph / eager: {ratio:.3f}")
    write_result(a.out, "prefill_probe", ratio, 1.0,
                 dict(shape=a.shape, tokens=a.tokens, procs=a.procs, steps=a.steps,
                      ratio="served prefill step (execute to logits on the host, device idle at the start): CUDA "
                            "graph replay / eager, medians over processes (< 1: the graphs are faster)"),
                 a.commit, summary=summary, processes=procs)

if __name__ == "__main__":
    main()
