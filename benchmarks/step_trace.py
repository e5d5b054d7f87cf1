"""Summarize PDSERVE_STEP_TRACE files (engine.llm_engine.StepTrace): per process, the
medians of its steps, those that issued KV sends apart.

    PDSERVE_STEP_TRACE=/tmp/steps python benchmarks/kv_exposed.py ...
    python benchmarks/step_trace.py /tmp/steps [--min-tokens 2048]"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--min-tokens", type=int, default=1, help="only steps of at least this many tokens")
    a = ap.parse_args()
    for path in sorted(Path(a.directory).glob("steps-*.jsonl")):
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [s for s in steps if s["tokens"] >= a.min_tokens]
        for sends in (False, True):
            group = [s for s in steps if s["sends"] == sends]
            if not group:
                continue
            med = {k: statistics.median(s[k] for s in group) for k in ("queue_ms", "gpu_ms", "step_ms", "forward_ms",
                                                                      "forward_cpu_ms")
                   if group[0].get(k) is not None}
            print(f"{path.name:24s} sends={sends!s:5s} steps {len(group):4d}  " +
                  "  ".join(f"{k} {v:7.3f}" for k, v in med.items()))


if __name__ == "__main__":
    main()
