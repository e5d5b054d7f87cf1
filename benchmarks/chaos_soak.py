"""Soak mode of the chaos harness: steady load for a long run with a fault every few
minutes; memory of every process (RSS from /proc, GPU memory from nvidia-smi where
there is one) and KV blocks sampled over time, p99 TTFT/TPOT per window, plotted."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from chaos_faults import Faults, leaked_blocks
from chaos_load import Load
from pdserve.client import status


def rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def descendants(pid: int) -> list[int]:
    """pid and its children, recursively (a supervisor's workers, a node's TP ranks)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return out


def gpu_mib() -> dict[int, float]:
    """GPU memory per pid (empty without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            usage[int(parts[0])] = float(parts[1]) if parts[1].replace(".", "").isdigit() else 0.0
    return usage


def sample(cluster, t0: float) -> dict:
    gpu = gpu_mib()
    procs = {}
    for p in cluster.procs:
        args = list(p.args)
        role = args[args.index("--role") + 1] if "--role" in args else "coordinator"
        for pid in descendants(p.pid):
            rss = rss_mib(pid)
            if rss is not None:
                procs[str(pid)] = {"role": role, "rss_mib": round(rss, 1), "gpu_mib": gpu.get(pid)}
    try:
        nodes = {n["id"]: n["kv_blocks_free"] for n in status(cluster.cfg.listen, timeout=2.0)["nodes"]}
    except Exception:
        nodes = {}
    return {"t": round(time.monotonic() - t0, 2), "procs": procs, "kv_free": nodes}


def p99(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[int(0.99 * (len(values) - 1))], 4) if values else None


def growth(samples: list[dict], key: str) -> dict[str, float]:
    """Per process alive from the first sample after warm-up to the last: its mean over the last
    tenth of the samples / over the first tenth."""
    if len(samples) < 4:
        return {}
    k = max(1, len(samples) // 10)
    first, last = samples[:k], samples[-k:]
    out = {}
    for pid in set(first[0]["procs"]) & set(last[-1]["procs"]):
        a = [s["procs"][pid][key] for s in first if pid in s["procs"] and s["procs"][pid][key]]
        b = [s["procs"][pid][key] for s in last if pid in s["procs"] and s["procs"][pid][key]]
        if a and b:
            out[pid] = round((sum(b) / len(b)) / (sum(a) / len(a)), 4)
    return out


def soak(cluster, faults: list[str], prompts, max_tokens: int, rate: float, duration_s: float,
         fault_every_s: float, window_s: float, timeout_s: float = 60.0, sample_s: float = 5.0,
         plot_dir: Path | None = None, log=print) -> dict:
    load = Load(cluster.cfg.listen, prompts, max_tokens, rate, timeout_s)
    injector = Faults(cluster, load)
    samples, struck = [], []
    load.start()
    t0 = time.monotonic()
    next_fault, next_sample, i = t0 + fault_every_s, t0, 0
    while time.monotonic() < t0 + duration_s:
        now = time.monotonic()
        if now >= next_sample:
            samples.append(sample(cluster, t0))
            next_sample = now + sample_s
        if faults and now >= next_fault:
            fault = faults[i % len(faults)]
            load.window = fault
            struck.append({"fault": fault, "t": round(injector.inject(fault) - t0, 2)})
            if injector.stalled is not None:
                injector.stalled.finish(timeout_s)
                injector.stalled = None
            log(f"soak: {fault} at {struck[-1]['t']} s")
            i, next_fault = i + 1, time.monotonic() + fault_every_s
        time.sleep(0.2)
    load.stop()
    windows = []
    for w in range(int(duration_s // window_s) or 1):
        outs = [o for o in load.outcomes if w * window_s <= o.sent - t0 < (w + 1) * window_s]
        ok = [o for o in outs if o.status == "ok"]
        windows.append({"start_s": w * window_s, "sent": len(outs), "completed": len(ok),
                        "lost": sum(o.status == "lost" for o in outs),
                        "p99_ttft_s": p99([o.ttft for o in ok if o.ttft is not None]),
                        "p99_tpot_s": p99([o.tpot for o in ok if o.tpot is not None])})
    measured = [w for w in windows if w["p99_ttft_s"]]
    ratio = measured[-1]["p99_ttft_s"] / measured[0]["p99_ttft_s"] if len(measured) >= 2 else None
    after_warmup = samples[1:] if len(samples) > 4 else samples
    rss, gpu = growth(after_warmup, "rss_mib"), growth(after_warmup, "gpu_mib")
    leaked, _ = leaked_blocks(cluster.cfg.listen)
    result = {"ratio": None if ratio is None else round(ratio, 4), "windows": windows, "faults_struck": struck,
              "rss_growth": rss, "gpu_growth": gpu, "max_rss_growth": max(rss.values(), default=None),
              "max_gpu_growth": max(gpu.values(), default=None), "leaked_blocks": leaked,
              "sent": len(load.outcomes), "lost": sum(o.status == "lost" for o in load.outcomes),
              "index_errors": sum(o.duplicates + o.skips for o in load.outcomes), "samples": samples}
    if plot_dir is not None:
        result["plots"] = plot(result, Path(plot_dir))
    return result


def plot(result: dict, folder: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True, exist_ok=True)
    samples = result["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    for pid in sorted({p for s in samples for p in s["procs"]}):
        pts = [(s["t"], s["procs"][pid]["rss_mib"]) for s in samples if pid in s["procs"]]
        role = next(s["procs"][pid]["role"] for s in samples if pid in s["procs"])
        axes[0].plot(*zip(*pts), label=f"{role} {pid}")
    axes[0].set_ylabel("RSS MiB")
    axes[0].legend(fontsize=6)
    for node in sorted({n for s in samples for n in s["kv_free"]}):
        pts = [(s["t"], s["kv_free"][node]) for s in samples if node in s["kv_free"]]
        axes[1].plot(*zip(*pts), label=node)
    axes[1].set_ylabel("free KV blocks")
    w = result["windows"]
    axes[2].plot([x["start_s"] for x in w], [x["p99_ttft_s"] or 0 for x in w], "o-", label="p99 TTFT")
    axes[2].plot([x["start_s"] for x in w], [x["p99_tpot_s"] or 0 for x in w], "s-", label="p99 TPOT")
    axes[2].set_ylabel("seconds")
    axes[2].set_xlabel("time (s)")
    axes[2].legend()
    for f in result["faults_struck"]:
        for ax in axes:
            ax.axvline(f["t"], color="grey", lw=0.5)
    path = folder / "soak.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]
