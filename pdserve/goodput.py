"""Goodput search (DistServe): SLO attainment as the request rate grows, the highest
rate with at least 90% attainment found by bisection, that rate at every SLO scale,
and the plots and Markdown summary. Every run made (swept, widened, bisected, each
seed) is recorded in the curve; nothing the headline rests on is left out."""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Callable

from pdserve.bench_result import jsonable

TARGET = 0.9
Run = Callable[[argparse.Namespace], dict]


def max_rate_meeting(attainment: Callable[[float], float], lo: float, hi: float, steps: int,
                     target: float = TARGET) -> tuple[float, float]:
    """(highest rate found meeting target, lowest found missing it) in [lo, hi], by
    bisection; lo must meet it and hi must not (attainment falls as the rate rises)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if attainment(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _tpot(t: float, e: float, o: int) -> float:
    return (e - t) / (o - 1) if o > 1 else 0.0


def attainments(s: dict, slos: dict[str, float]) -> dict[str, float]:
    """Fraction of ALL requests meeting every SLO ("both"), TTFT only, TPOT only; a
    failed request (non-empty `errors` entry) meets none."""
    ok = [not e for e in s["errors"]]
    n = len(ok)
    ttft = [g and t * 1e3 <= slos.get("ttft", float("inf")) for g, t in zip(ok, s["ttfts"])]
    tpot = [g and _tpot(t, e, o) * 1e3 <= slos.get("tpot", float("inf"))
            for g, t, e, o in zip(ok, s["ttfts"], s["latencies"], s["output_lens"])]
    e2el = [g and e * 1e3 <= slos.get("e2el", float("inf")) for g, e in zip(ok, s["latencies"])]
    return {"both": sum(a and b and c for a, b, c in zip(ttft, tpot, e2el)) / n, "ttft": sum(ttft) / n,
            "tpot": sum(tpot) / n}


def scaled(slos: dict[str, float], k: float) -> dict[str, float]:
    return {name: v * k for name, v in slos.items()}


class Search:
    """Runs at each rate (one per seed, cached), their attainment at every SLO scale."""

    def __init__(self, a: argparse.Namespace, run: Run, slos: dict[str, float], scales: list[float], head: float):
        self.a, self.run, self.slos, self.scales, self.head = a, run, slos, scales, head
        self.seeds = [a.seed + j for j in range(max(1, getattr(a, "seeds", 1)))]
        self.points: dict[float, dict] = {}

    def attainment(self, rate: float, scale: float, phase: str = "bisect") -> float:
        """Mean "both" attainment over the seeds at rate under SLOs x scale (runs it once)."""
        if rate not in self.points:
            self.points[rate] = self._measure(rate, phase)
        return self.points[rate]["by_scale"][_key(scale)]["both"]

    def _measure(self, rate: float, phase: str) -> dict:
        runs = []
        for seed in self.seeds:
            s = self.run(_with(self.a, request_rate=rate, seed=seed))
            runs.append({"seed": seed, "achieved_rate": s["achieved_request_rate"], "num_prompts": s["num_prompts"],
                         "failed": s["failed"], "duration": s["duration"], "max_send_lag_s": s.get("max_send_lag_s"),
                         "request_throughput": s["request_throughput"],
                         "by_scale": {_key(k): attainments(s, scaled(self.slos, k)) for k in self.scales}})
            err = next((e for e in s["errors"] if e), "")
            failed = f", {s['failed']} failed (first: {err})" if s["failed"] else ""
            head = runs[-1]["by_scale"][_key(self.head)]
            print(f"  rate {rate:8.2f} req/s (offered {s['achieved_request_rate']:.2f}, seed {seed}, {phase}): "
                  f"attainment both {head['both']:.2f}, ttft {head['ttft']:.2f}, tpot {head['tpot']:.2f}{failed}",
                  flush=True)
        by_scale = {}
        for k in self.scales:
            rows = [r["by_scale"][_key(k)] for r in runs]
            both = [r["both"] for r in rows]
            by_scale[_key(k)] = {"both": statistics.mean(both), "both_min": min(both), "both_max": max(both),
                                 "both_std": statistics.pstdev(both), "ttft": statistics.mean(r["ttft"] for r in rows),
                                 "tpot": statistics.mean(r["tpot"] for r in rows)}
        return {"rate": rate, "phase": phase, "achieved_rate": statistics.mean(r["achieved_rate"] for r in runs),
                "num_prompts": runs[0]["num_prompts"], "failed": sum(r["failed"] for r in runs),
                "request_throughput": statistics.mean(r["request_throughput"] for r in runs),
                "by_scale": by_scale, "runs": runs}

    def curve(self, scale: float) -> list[dict]:
        """One row per rate run, at SLOs x scale: the mean and spread over seeds."""
        rows = []
        for rate in sorted(self.points):
            p = self.points[rate]
            rows.append({k: v for k, v in p.items() if k != "by_scale"} | p["by_scale"][_key(scale)])
        return rows

    def goodput(self, scale: float, bisect_steps: int) -> dict:
        """Max goodput at SLOs x scale: the highest rate meeting the target below the
        lowest rate missing it; bisected between them when bisect_steps > 0."""
        rates = sorted(self.points)
        met = lambda r: self.points[r]["by_scale"][_key(scale)]["both"] >= TARGET  # noqa: E731
        first_miss = next((r for r in rates if not met(r)), None)
        below = [r for r in rates if met(r) and (first_miss is None or r < first_miss)]
        lo, hi = (max(below) if below else 0.0), first_miss
        if below and hi is not None and bisect_steps:
            lo, hi = max_rate_meeting(lambda r: self.attainment(r, scale), lo, hi, bisect_steps)
        bisected = bool(bisect_steps) and bool(below) and hi is not None
        bound = ("none met: lower the rates" if not below else "lower bound: no rate run missed" if hi is None
                 else "bisected: in [max_goodput_rate, next_missing_rate)" if bisected
                 else "not bisected: in [max_goodput_rate, next_missing_rate) of the rates run")
        return {"scale": scale, "slos_ms": scaled(self.slos, scale), "max_goodput_rate": lo,
                "next_missing_rate": hi, "bracketed": bool(below) and hi is not None, "bisected": bisected,
                "bound": bound}


def sweep(a: argparse.Namespace, run: Run, slos: dict[str, float]) -> dict:
    """Attainment curves over --sweep rates (widened until they bracket the target), then
    the max goodput by bisection at the headline scale (and at every scale if asked)."""
    head = float(getattr(a, "headline_scale", 1.0))
    scales = sorted({head, *(float(x) for x in (getattr(a, "slo_scale", None) or "").split(",") if x)})
    search = Search(a, run, slos, scales, head)
    for rate in sorted(float(r) for r in a.sweep.split(",")):
        search.attainment(rate, head, "sweep")
    for _ in range(getattr(a, "sweep_extend", 0)):  # the rates given may not bracket the goodput: widen them
        both = [search.attainment(r, head) for r in sorted(search.points)]
        if all(b >= TARGET for b in both):
            search.attainment(max(search.points) * 2, head, "extend")
        elif all(b < TARGET for b in both):
            search.attainment(min(search.points) / 2, head, "extend")
        else:
            break
    by_scale = [search.goodput(k, a.bisect_steps if k == head or getattr(a, "bisect_all_scales", False) else 0)
                for k in scales]
    headline = next(g for g in by_scale if g["scale"] == head)
    return {"curve": search.curve(head), "max_goodput_rate": headline["max_goodput_rate"],
            "next_missing_rate": headline["next_missing_rate"], "bracketed": headline["bracketed"],
            "bound": headline["bound"], "headline_scale": head, "by_scale": by_scale, "seeds": search.seeds,
            "target_attainment": TARGET, "slos_ms": slos}


def slo_scale(a: argparse.Namespace, run: Run, slos: dict[str, float]) -> list[dict]:
    """Attainment at a fixed rate as every SLO is multiplied by each --slo-scale factor."""
    s = run(a)
    return [{"scale": k, **attainments(s, scaled(slos, k))} for k in sorted(float(x) for x in a.slo_scale.split(","))]


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
        if panel == "sweep" and any(r.get("both_max", r["both"]) != r.get("both_min", r["both"]) for r in rows):
            ax.fill_between(x, [100 * r["both_min"] for r in rows], [100 * r["both_max"] for r in rows], alpha=0.2,
                            label="both: seed spread")
        ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("request rate asked (req/s)" if panel == "sweep" else "SLO scale")
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
        lines += [f"Maximum goodput (>= {int(100 * TARGET)}% attainment, SLO scale {sw.get('headline_scale', 1):g}): "
                  f"**{sw['max_goodput_rate']:.2f} req/s** ({sw.get('bound', '')})", "",
                  "| rate asked (req/s) | offered | run as | requests x seeds | both (min-max) | TTFT only | "
                  "TPOT only | failed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['rate']:.2f} | {c.get('achieved_rate', float('nan')):.2f} | {c.get('phase', '')} | "
                  f"{c.get('num_prompts', '')} x {len(c.get('runs', [1]))} | {c['both']:.2f} "
                  f"({c.get('both_min', c['both']):.2f}-{c.get('both_max', c['both']):.2f}) | {c['ttft']:.2f} | "
                  f"{c['tpot']:.2f} | {c.get('failed', 0)} |" for c in sw["curve"]]
        if sw.get("by_scale"):
            lines += ["", "| SLO scale | max goodput (req/s) | next rate missing | bisected | bound |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {g['scale']:g} | {g['max_goodput_rate']:.2f} | {g['next_missing_rate'] or '-'} | "
                      f"{'yes' if g['bisected'] else 'no'} | {g['bound']} |" for g in sw["by_scale"]]
    if result.get("slo_scale"):
        lines += ["", "| SLO scale | both | TTFT only | TPOT only |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['scale']:g} | {r['both']:.2f} | {r['ttft']:.2f} | {r['tpot']:.2f} |" for r in result["slo_scale"]]
    return "\n".join(lines) + "\n"


def run_search(a: argparse.Namespace, run: Run, slos: dict[str, float]) -> dict:
    if not slos:
        raise SystemExit("--sweep and --slo-scale need --goodput SLOs")
    result = {"label": a.label or a.model_id, "slos_ms": slos}
    if a.sweep:
        result["sweep"] = sw = sweep(a, run, slos)
        print(f"maximum goodput: {sw['max_goodput_rate']:.2f} req/s at >= {int(100 * TARGET)}% attainment, "
              f"SLO scale {sw['headline_scale']:g} ({sw['bound']})")
        for g in sw["by_scale"]:
            print(f"  SLO scale {g['scale']:5g}: {g['max_goodput_rate']:.2f} req/s ({g['bound']})")
    elif a.slo_scale:
        result["slo_scale"] = slo_scale(a, run, slos)
    out = Path(a.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.result_filename.removesuffix(".json") if a.result_filename else "goodput"
    (out / f"{stem}.json").write_text(json.dumps(jsonable(result), indent=2, allow_nan=False))
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print(f"-> {out / stem}.json / .md / .png")
    return result


def _key(scale: float) -> str:
    return f"{scale:g}"


def _with(a: argparse.Namespace, **changes) -> argparse.Namespace:
    b = copy.copy(a)
    for k, v in changes.items():
        setattr(b, k, v)
    return b
