"""Goodput search (DistServe): SLO attainment as the request rate grows, the highest
rate with at least 90% attainment found by bisection, attainment as the SLOs are
scaled, and the plots and Markdown summary of both."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Callable

TARGET = 0.9


def max_rate_meeting(attainment: Callable[[float], float], lo: float, hi: float, steps: int,
                     target: float = TARGET) -> float:
    """Highest rate in [lo, hi] whose attainment >= target, by bisection; lo must meet it
    and hi must not (attainment falls as the rate rises)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if attainment(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def attainments(s: dict, slos: dict[str, float]) -> dict[str, float]:
    """Fraction of requests meeting both SLOs, TTFT only, TPOT only (failed requests miss)."""
    n = s["num_prompts"]
    ttft_ok = [t * 1e3 <= slos.get("ttft", float("inf")) for t in s["ttfts"]]
    tpot_ok = [((e - t) / (o - 1) if o > 1 else 0.0) * 1e3 <= slos.get("tpot", float("inf"))
               for t, e, o in zip(s["ttfts"], s["e2els"], s["output_lens"])]
    return {"both": sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / n, "ttft": sum(ttft_ok) / n,
            "tpot": sum(tpot_ok) / n}


def sweep(a: argparse.Namespace, run: Callable[[argparse.Namespace], dict], slos: dict[str, float]) -> dict:
    """Attainment curves over --sweep rates, then bisection for the maximum goodput."""
    curve = []

    def point(rate: float) -> None:
        s = run(_with(a, request_rate=rate))
        curve.append({"rate": rate, **attainments(s, slos), "request_throughput": s["request_throughput"],
                      "num_prompts": s["num_prompts"], "failed": s.get("failed", 0)})
        curve.sort(key=lambda c: c["rate"])
        c = next(c for c in curve if c["rate"] == rate)
        failed = f", {c['failed']} failed (first: {s['errors'][0]})" if c["failed"] else ""
        print(f"  rate {rate:8.2f} req/s: attainment both {c['both']:.2f}, ttft {c['ttft']:.2f}, "
              f"tpot {c['tpot']:.2f}{failed}", flush=True)
    for rate in sorted(float(r) for r in a.sweep.split(",")):
        point(rate)
    for _ in range(getattr(a, "sweep_extend", 0)):  # the rates given may not bracket the goodput: widen them
        if all(c["both"] >= TARGET for c in curve):
            point(curve[-1]["rate"] * 2)
        elif all(c["both"] < TARGET for c in curve):
            point(curve[0]["rate"] / 2)
        else:
            break
    meeting = [c["rate"] for c in curve if c["both"] >= TARGET]
    missing = [c["rate"] for c in curve if c["both"] < TARGET and (not meeting or c["rate"] > max(meeting))]
    best = max(meeting) if meeting else 0.0
    if meeting and missing and a.bisect_steps:
        best = max_rate_meeting(lambda r: attainments(run(_with(a, request_rate=r)), slos)["both"],
                                best, min(missing), a.bisect_steps)
    # unbracketed: every rate met the target, so the goodput is at least `best` (a lower bound);
    # or none did (best 0: lower the rates)
    return {"curve": curve, "max_goodput_rate": best, "bracketed": bool(meeting and missing),
            "target_attainment": TARGET, "slos_ms": slos}


def slo_scale(a: argparse.Namespace, run: Callable[[argparse.Namespace], dict], slos: dict[str, float]) -> list[dict]:
    """Attainment at a fixed rate as every SLO is multiplied by each --slo-scale factor."""
    s = run(a)
    out = []
    for k in sorted(float(x) for x in a.slo_scale.split(",")):
        out.append({"scale": k, **attainments(s, {name: v * k for name, v in slos.items()})})
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in ("sweep", "slo_scale") if result.get(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = result[panel]["curve"] if panel == "sweep" else result[panel]
        x = [r["rate" if panel == "sweep" else "scale"] for r in rows]
        for key, label in (("both", "TTFT and TPOT"), ("ttft", "TTFT only"), ("tpot", "TPOT only")):
            ax.plot(x, [100 * r[key] for r in rows], marker="o", label=label)
        ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("request rate (req/s)" if panel == "sweep" else "SLO scale")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        if panel == "sweep" and result["sweep"]["max_goodput_rate"]:
            ax.axvline(result["sweep"]["max_goodput_rate"], color="black", linestyle=":", linewidth=1,
                       label="max goodput")
        ax.set_title(result.get("label", "pdserve"))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"# Goodput: {result.get('label', 'pdserve')}", "", f"SLOs: {result['slos_ms']} (ms)", ""]
    if result.get("sweep"):
        sw = result["sweep"]
        bound = "" if sw.get("bracketed", True) or not sw["max_goodput_rate"] else \
            " (a lower bound: every rate swept met the target)"
        lines += [f"Maximum goodput (>= {int(100 * TARGET)}% attainment): "
                  f"**{sw['max_goodput_rate']:.2f} req/s**{bound}", "",
                  "| rate (req/s) | requests | both | TTFT only | TPOT only | failed |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['rate']:.2f} | {c.get('num_prompts', '')} | {c['both']:.2f} | {c['ttft']:.2f} | "
                  f"{c['tpot']:.2f} | {c.get('failed', 0)} |" for c in sw["curve"]]
    if result.get("slo_scale"):
        lines += ["", "| SLO scale | both | TTFT only | TPOT only |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['scale']:g} | {r['both']:.2f} | {r['ttft']:.2f} | {r['tpot']:.2f} |" for r in result["slo_scale"]]
    return "\n".join(lines) + "\n"


def run_search(a: argparse.Namespace, run: Callable[[argparse.Namespace], dict], slos: dict[str, float]) -> dict:
    if not slos:
        raise SystemExit("--sweep and --slo-scale need --goodput SLOs")
    result = {"label": a.label or a.model_id, "slos_ms": slos}
    if a.sweep:
        result["sweep"] = sweep(a, run, slos)
        sw = result["sweep"]
        print(f"maximum goodput: {sw['max_goodput_rate']:.2f} req/s at >= {int(100 * TARGET)}% attainment"
              + ("" if sw["bracketed"] or not sw["max_goodput_rate"] else " (lower bound: no swept rate missed)"))
    if a.slo_scale:
        result["slo_scale"] = slo_scale(a, run, slos)
    out = Path(a.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.result_filename.removesuffix(".json") if a.result_filename else "goodput"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print(f"-> {out / stem}.json / .md / .png")
    return result


def _with(a: argparse.Namespace, **changes) -> argparse.Namespace:
    b = copy.copy(a)
    for k, v in changes.items():
        setattr(b, k, v)
    return b



