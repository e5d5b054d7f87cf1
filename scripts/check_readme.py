"""Check every figure README.md and benchmarks/README.md quote against the result JSONs.

    python scripts/check_readme.py      # exit 1 and list what differs

Each CLAIMS entry names a document, a pattern that must occur in it once, and, per
captured figure, the result value it must print as (or a condition the results must
meet, for a sentence like "short of its target"). Then every figure-like number in the
two READMEs' prose (a decimal, a percentage, a multiple such as 2.00x; code blocks and
the generated results table left out: benchmarks/report.py checks that one) must lie
inside a claim or be listed in NOT_RESULTS with why it is no measurement. docs/RESULTS.md's
figures for the current headline files are claims too (its history cites the archive).
Standard library only, so tests run it without the benchmarks' dependencies."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COVERED = ("README.md", "benchmarks/README.md")  # every figure in these must be a claim


def load(name: str, results: Path = RESULTS) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def at(data, path: str):
    """data's value at a dotted path; a number in the path indexes a list, name=value
    picks the list entry whose `name` field is value (e.g. cases.case=llama-3.2-1b 2K.ratio)."""
    for part in path.split("."):
        if isinstance(data, list):
            if "=" in part:
                k, v = part.split("=", 1)
                data = next(x for x in data if str(x.get(k)) == v)
            else:
                data = data[int(part)]
        else:
            data = data[part]
    return data


@dataclass
class Fig:
    """A figure: the result at path, printed with fmt (a format spec, or a function)."""
    result: str
    path: str
    fmt: str | Callable = ".2f"

    def expected(self, results: Path = RESULTS) -> str:
        v = at(load(self.result, results), self.path) if self.path else load(self.result, results)
        return self.fmt(v) if callable(self.fmt) else format(v, self.fmt)


@dataclass
class Cond:
    """A sentence's condition on the results: test(result) must hold."""
    result: str
    test: Callable[[dict], bool]
    says: str


@dataclass
class Claim:
    doc: str
    pattern: str                 # a regex; its groups are the figures, in order
    figures: tuple = ()          # one Fig per group, or Cond (no group)


def per(a: str, b: str, fmt: str = ".2f") -> Callable:
    """a / b of one result's values, for a figure the JSON holds as its two parts."""
    return lambda r: format(at(r, a) / at(r, b), fmt)


def below_target(r: dict) -> bool:
    return r["ratio"] < r["target"]


def above_target(r: dict) -> bool:
    return r["ratio"] > r["target"]


CLAIMS = [
    # README.md: the status paragraph
    Claim("README.md", r"gave \*\*(\d+\.\d+)x\*\* goodput per GPU on a prefill-heavy workload and \*\*(\d+\.\d+)x\*\* on a"
                       r" decode-heavy one", (Fig("goodput_prefill_heavy", "ratio"), Fig("goodput_decode_heavy", "ratio"))),
    Claim("README.md", r"one SLO choice \(TTFT (\d+(?:\.\d+)?) ms and TPOT (\d+(?:\.\d+)?) ms prefill-heavy\)",
          (Fig("goodput_prefill_heavy", "config.ttft_ms", "g"), Fig("goodput_prefill_heavy", "config.tpot_ms", "g"))),
    Claim("README.md", r"The NCCL transport is short of its bandwidth \((\d\.\d\d)\) and exposed-TTFT \((\d\.\d\d)\) targets",
          (Fig("kv_transfer_nccl", "ratio"), Fig("kv_transfer_exposed", "ratio"),
           Cond("kv_transfer_nccl", below_target, "bandwidth ratio below its target"),
           Cond("kv_transfer_exposed", above_target, "exposed TTFT ratio above its (upper) target"))),
    Claim("README.md", r"one colocated node\s+reaches \*\*(\d\.\d\d)\*\* of the engine's offline throughput",
          (Fig("serving_overhead", "ratio"),)),
    Claim("README.md", r"1P1D\s+over CUDA IPC serves \*\*(\d\.\d\d)\*\* of what a colocated node does",
          (Fig("serving_1p1d_one_gpu", "ratio"),)),
    Claim("README.md", r"the IPC copy runs at\s+\*\*(\d\.\d\d)\*\* of a raw device copy", (Fig("kv_transfer_ipc", "ratio"),)),
    # benchmarks/README.md: targets of results that have a file
    Claim("benchmarks/README.md", r"the target (\d\.\d) means \"a change did not slow", (Fig("served_ab", "target", ".1f"),)),
    Claim("benchmarks/README.md", r"case over tcp; the target is (\d\.\d)\.", (Fig("kv_transfer_zmq", "target", ".1f"),)),
    Claim("benchmarks/README.md", r"8B case; target (\d\.\d\d)\.", (Fig("kv_transfer_nccl", "target"),)),
    Claim("benchmarks/README.md", r"<= (\d\.\d\d)\. Each round's own ratio", (Fig("kv_transfer_exposed", "target"),)),
    # docs/RESULTS.md: figures of the current headline files
    Claim("docs/RESULTS.md", r"1B, with prefill graphs \(H200, 2026-12-03, 2ce9538\): ([\d,]+) tok/s against ([\d,]+)\s+"
                             r"tok/s, (\d+\.\d)\.",
          (Fig("engine_throughput", "ours.tok_per_s", ",.0f"), Fig("engine_throughput", "transformers.tok_per_s", ",.0f"),
           Fig("engine_throughput", "ratio", ".1f"))),
    Claim("docs/RESULTS.md", r"8B, TP 2 on two H200s \(2026-11-21, 3894ce6\): ([\d,]+) tok/s \(TP 1: ([\d,]+), so TP 2 is\s+"
                             r"(\d\.\d\d)x\) against transformers' (\d+) tok/s on one GPU, (\d+\.\d)",
          (Fig("engine_throughput_llama-3.1-8b_tp2", "ours.tok_per_s", ",.0f"),
           Fig("engine_throughput_llama-3.1-8b_tp2", "ours_by_tp.0.tok_per_s", ",.0f"),
           Fig("engine_throughput_llama-3.1-8b_tp2", "tp_scaling.tp2_over_tp1"),
           Fig("engine_throughput_llama-3.1-8b_tp2", "transformers.tok_per_s", ".0f"),
           Fig("engine_throughput_llama-3.1-8b_tp2", "ratio", ".1f"))),
    Claim("docs/RESULTS.md", r"one GPU against one GPU, TP 1 is (\d+\.\d) and TP 2 per GPU (\d+\.\d)",
          (Fig("engine_throughput_llama-3.1-8b_tp2", "", lambda r: f"{r['ours_by_tp'][0]['tok_per_s'] / r['transformers']['tok_per_s']:.1f}"),
           Fig("engine_throughput_llama-3.1-8b_tp2", "", lambda r: f"{r['ours_by_tp'][1]['tok_per_s'] / 2 / r['transformers']['tok_per_s']:.1f}"))),
    Claim("docs/RESULTS.md", r"1B \(H200, 2026-12-03, 49eda76\): (\d\.\d+) ms against a (\d\.\d+) ms floor, (\d\.\d\d)",
          (Fig("decode_latency", "rows.batch=1.step_ms", ".3f"), Fig("decode_latency", "rows.batch=1.floor_ms", ".3f"),
           Fig("decode_latency", "ratio"))),
    Claim("docs/RESULTS.md", r"The batch-1 1B step is (\d+)% short of the 0.5 target \(it takes (\d+)% longer than twice",
          (Fig("decode_latency", "", lambda r: f"{100 * (1 - r['ratio'] / r['target']):.0f}"),
           Fig("decode_latency", "rows.batch=1", lambda b: f"{100 * (b['step_ms'] / (2 * b['floor_ms']) - 1):.0f}"))),
    Claim("docs/RESULTS.md", r"8B-shaped 4K KV .*?94c61d5: (\d\.\d+) ms against (\d\.\d+) ms,\s+(\d\.\d+) \(torch's send: "
                             r"(\d\.\d+) ms, (\d\.\d+)\)\. 1B-shaped 2K: (\d\.\d+) against (\d\.\d+) ms \((\d\.\d+)\)",
          (Fig("kv_transfer_nccl", "cases.0.ours_ms", ".3f"), Fig("kv_transfer_nccl", "cases.0.raw_ms", ".3f"),
           Fig("kv_transfer_nccl", "ratio", ".3f"), Fig("kv_transfer_nccl", "cases.0.raw_torch_ms", ".3f"),
           Fig("kv_transfer_nccl", "cases.0.ratio_vs_raw_torch", ".3f"), Fig("kv_transfer_nccl", "cases.1.ours_ms", ".3f"),
           Fig("kv_transfer_nccl", "cases.1.raw_ms", ".3f"), Fig("kv_transfer_nccl", "cases.1.ratio", ".3f"))),
    Claim("docs/RESULTS.md", r"the 1B-shaped 2K KV gets (\d\.\d\d) of it", (Fig("kv_transfer_nccl", "cases.1.ratio"),)),
]

# Figure-like numbers in COVERED docs that are no measurement: (doc, the text around it, why)
NOT_RESULTS = [
    ("benchmarks/README.md", "(target 0.9); the", "serving_overhead's target (no result file yet)"),
    ("benchmarks/README.md", "target within 10%)", "serving_overhead's TPOT target"),
    ("benchmarks/README.md", "(1.0 is linear; target 0.8,", "relay's scale and target (no result file yet)"),
    ("benchmarks/README.md", "(target >= 0.8);", "kv_transfer_zmq_load's target (no result file yet)"),
    ("benchmarks/README.md", "(target <= 1.5).", "kv_transfer_zmq_load's latency target"),
    ("benchmarks/README.md", "first cluster ran ~30% slower", "a method note: why a warm-up round (runs not kept)"),
    ("benchmarks/README.md", "(default 0.5,1,2,4;", "a flag's default (the SLO scales)"),
    ("README.md", "at which 90% of requests", "goodput's definition (DistServe's attainment target)"),
    ("benchmarks/README.md", "target 1.0 with 0 lost", "chaos's target (no result file yet)"),
    ("benchmarks/README.md", "(target <= 1.2)", "the chaos soak's p99 drift target (no result file yet)"),
    ("benchmarks/README.md", "target within 5%", "the chaos soak's memory growth target"),
    ("benchmarks/README.md", "about 70% of the measured", "a method note: the soak's load (a share of goodput)"),
    ("benchmarks/README.md", "by bisection at 90%", "goodput's definition (DistServe's attainment target)"),
]


def prose(text: str) -> str:
    """text with fenced or indented code blocks and the generated results table blanked
    (spaces of the same length, so positions match the text's)."""
    text = re.sub(r"<!-- results -->.*?<!-- /results -->", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    out, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
            out.append(" " * len(line))
        elif fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "*")):
            out.append(" " * len(line))
        else:
            out.append(line)
    return "\n".join(out)


FIGURE = re.compile(r"(?<![\w.\-/])(\d+(?:\.\d+)?(?:%|x(?!\w))|\d+\.\d+(?!\.?[\w\-]))")


def check(root: Path = ROOT) -> list[str]:
    """What differs; empty when every claim holds and every figure is claimed or excused."""
    problems, spans = [], {doc: [] for doc in COVERED}
    results = root / "benchmarks" / "results"
    for c in CLAIMS:
        text = (root / c.doc).read_text()
        found = list(re.finditer(c.pattern.replace(" ", r"\s+"), text, flags=re.S))  # across line breaks
        if len(found) != 1:
            problems.append(f"{c.doc}: {'no' if not found else len(found)} match(es) of {c.pattern!r}")
            continue
        m = found[0]
        spans.setdefault(c.doc, []).append(m.span())
        figs = [f for f in c.figures if isinstance(f, Fig)]
        if len(figs) != len(m.groups()):
            problems.append(f"{c.doc}: {c.pattern!r} has {len(m.groups())} figures, the claim {len(figs)}")
        for got, f in zip(m.groups(), figs):
            want = f.expected(results)
            if got != want:
                problems.append(f"{c.doc}: quotes {got} where {f.result}.json's {f.path or 'figure'} is {want}")
        for cond in (f for f in c.figures if isinstance(f, Cond)):
            if not cond.test(load(cond.result, results)):
                problems.append(f"{c.doc}: says {cond.says}, {cond.result}.json does not")
    for doc in COVERED:
        text = prose((root / doc).read_text())
        excused = [(text.find(around), text.find(around) + len(around)) for d, around, _ in NOT_RESULTS if d == doc]
        for gone in (around for d, around, _ in NOT_RESULTS if d == doc and around not in text):
            problems.append(f"{doc}: NOT_RESULTS lists a phrase it no longer has ({gone!r})")
        for m in FIGURE.finditer(text):
            inside = any(a <= m.start() < b for a, b in spans[doc] + excused if a >= 0)
            if not inside:
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{doc}:{line}: figure {m.group(0)} is in no claim (scripts/check_readme.py CLAIMS) "
                                "and not excused as no measurement (NOT_RESULTS)")
    return problems


def main() -> None:
    problems = check()
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"{len(CLAIMS)} claims hold; every figure in {', '.join(COVERED)} is claimed")


if __name__ == "__main__":
    main()
