"""The README's results table, rendered from the headline result files.

    python benchmarks/report.py           # rewrite README.md between the results markers
    python benchmarks/report.py --check   # exit 1 if the README's table differs from the files
    python benchmarks/report.py --print   # print the table

One row per JSON in benchmarks/results/ (not its subfolders: a run's parts and the
archive): what ran, what its ratio divides, the ratio against its target, where and
when. Standard library only, so tests import it without the benchmarks' dependencies."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results -->", "<!-- /results -->"

# benchmark -> what its ratio divides; the order of the table
RATIO_OF = {
    "engine_throughput": "tok/s: ours / transformers",
    "decode_latency": "step time: bandwidth floor / ours",
    "served_ab": "served tok/s: this tree / an earlier one",
    "serving_overhead": "tok/s: served / offline",
    "relay": "relay tok/s: W workers / (W x 1 worker)",
    "kv_transfer_zmq": "bandwidth: ours / bare pyzmq",
    "kv_transfer_zmq_load": "aggregate GB/s: ours / bare pyzmq",
    "kv_transfer_zmq_curve": "bandwidth: CURVE on / off",
    "serving_tls": "served tok/s: TLS + CURVE / plain",
    "kv_transfer_nccl": "bandwidth: ours / bare NCCL send",
    "kv_transfer_exposed": "TTFT: 1P1D over NCCL / prefill alone",
    "kv_transfer_ipc": "copy time: raw device copy / ours",
    "kv_transfer_exposed_ipc": "TTFT: 1P1D over cuda-ipc on one GPU / prefill alone",
    "serving_1p1d_one_gpu": "served tok/s: 1P1D over cuda-ipc / colocated, one GPU",
    "prefill_probe": "prefill step: CUDA graph / eager",
    "prefill_graphs_ttft": "TTFT: prefill graphs / eager",
    "goodput_prefill_heavy": "goodput per GPU: 1P1D / colocated",
    "goodput_decode_heavy": "goodput per GPU: 1P1D / colocated",
}
LOWER_IS_BETTER = {"kv_transfer_exposed", "kv_transfer_exposed_ipc", "prefill_probe", "prefill_graphs_ttft"}


def shape(name: str) -> str:
    """'llama-3.2-1b' -> '1B'; other names as they are."""
    return {"llama-3.2-1b": "1B", "llama-3.1-8b": "8B"}.get(name, name)


def tokens(n: int) -> str:
    """2048 -> '2K'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def setup(r: dict) -> str:
    """What ran, from the result's config, in a few words."""
    c, b = r["config"], r["benchmark"]
    if b == "engine_throughput":
        lo, hi = c["input_len"]
        if not c.get("same_workload"):  # before issue 22: ours and transformers ran different output lengths
            hf = r["transformers"]["tok_per_s"]
            by_tp = "".join(f"; TP {x['tp']}: {x['tok_per_s'] / hf:.1f}" + (f", {x['tok_per_s'] / x['tp'] / hf:.1f}"
                                                                          " per GPU" if x["tp"] > 1 else "")
                            for x in r.get("ours_by_tp", []) if len(r["ours_by_tp"]) > 1)
            return (f"{shape(c['shape'])}, TP {c['tp']}, {c['num_seqs']} seqs of {lo}-{hi} in and out "
                    f"(transformers {c['hf_max_new_tokens']} out, on one GPU{by_tp})")
        per_gpu = "".join(f"; TP {x['tp']}: {x['ratio_per_gpu']:.1f} per GPU" for x in r.get("ours_by_tp", [])
                          if x["tp"] != c["tp"])
        return f"{shape(c['shape'])}, TP {c['tp']}, {c['num_seqs']} seqs of {lo}-{hi} in, {c['output_len']} out{per_gpu}"
    if b == "decode_latency":
        return f"{shape(c['shape'])}, TP {c['tp']}, batch 1, context {c['context']}"
    if b == "served_ab":
        return (f"{shape(c['shape'])}, 1 colocated node, {c['input_len']} in / {c['output_len']} out, "
                f"{c['concurrency']} streams, vs {c['other_commit'][:7]}")
    if b == "serving_overhead":
        return (f"{shape(c['shape'])}, 1 colocated node, {c['input_len']} in / {c['output_len']} out, "
                f"{c['concurrency'][0]} streams (TPOT / offline step {r['tpot_over_step']:.2f})")
    if b == "relay":
        ws = c["workers"]
        return (f"synthetic nodes, {c['streams']} streams, {ws[-1]} workers: "
                f"{r['tok_s_at_max_workers'] / 1e3:,.0f}k tok/s ({c['host_cpu']}, {c['cpus']} CPUs)")
    if b == "kv_transfer_zmq":
        case, endpoint = c["headline"].split(" over ")
        ipc = next((x["ratio"] for x in r["cases"] if x["case"] == case and x["endpoint"] == "ipc"), None)
        name = case.split(" ")[0]
        return f"{shape(name)} {tokens(c['tokens'])}-token KV, {endpoint}" + (f" (ipc {ipc:.2f})" if ipc else "")
    if b == "kv_transfer_zmq_curve":
        case, endpoint = c["headline"].split(" over ")
        return f"{shape(case.split(' ')[0])} {tokens(c['tokens'])}-token KV, {endpoint}"
    if b == "serving_tls":
        return (f"{shape(c['shape'])}, 1P1D, {c['input_len']} in / {c['output_len']} out, "
                f"{c['concurrency']} streams, mTLS + secret + API key + CURVE")
    if b == "kv_transfer_zmq_load":
        lat = r.get("latency_ratio_c1")
        return (f"{shape(c['shape'])} {c['tokens']}-token KV ({c['transfer_mib']:g} MiB), "
                f"{c['headline_concurrency']} in flight, into {c['kv_device']}"
                + (f" (C=1 latency {lat:.2f}x raw)" if lat is not None else ""))
    if b == "kv_transfer_nccl":
        name, length = c["headline"].split(" ")
        return f"{shape(name)} {length}-token KV, GPU 0 -> GPU 1"
    if b == "kv_transfer_ipc":
        return f"{shape(c['shape'])} {tokens(c['tokens'])}-token KV into another process's blocks, one GPU"
    if b == "serving_1p1d_one_gpu":
        return (f"{shape(c['shape'])}, {c['input_len']} in / {c['output_len']} out, {c['concurrency']} streams, "
                f"one GPU")
    if b in ("kv_transfer_exposed", "kv_transfer_exposed_ipc", "prefill_graphs_ttft"):
        return f"{shape(c['shape'])}, {tokens(c['prompt_len'])}-token prompts, concurrency 1, {c['rounds']} rounds"
    if b == "prefill_probe":
        return f"{shape(c['shape'])}, {tokens(c['tokens'])}-token step, {c['procs']} processes"
    if b.startswith("goodput_"):
        host = c.get("host", {})
        shared = " (host shared: " + host["summary"] + ")" if host.get("shared") else ""
        scales = "".join(f"; x{x['scale']:g}: {number(x['ratio'])}" for x in r.get("ratio_by_slo_scale", [])
                         if x["scale"] != c.get("headline_scale", 1.0))
        return (f"{shape(c['model'])}, {tokens(c['input_len'])} in / {c['output_len']} out, "
                f"SLOs TTFT {c['ttft_ms']} ms, TPOT {c['tpot_ms']} ms (scale {c.get('headline_scale', 1):g}"
                f"{scales}), {c.get('ratio_is', 'exact')}{shared}"
                + ("" if "slo_scales" in c else ", at nominal rates (the schedule before issue 22 offered fewer)"))
    return ""


def gpus(r: dict) -> int:
    """How many of the result's device took part."""
    c, b = r["config"], r["benchmark"]
    if b in ("kv_transfer_nccl", "kv_transfer_exposed") or b.startswith("goodput_"):
        return 2
    return int(c.get("tp", 1))


def device(r: dict) -> str:
    if r["benchmark"] in ("kv_transfer_zmq", "kv_transfer_zmq_curve"):
        return f"{r['device'].replace('(R)', '')}, {r['config']['cpus']} CPUs"
    n = gpus(r)
    return f"{n}x {r['device']}" if n > 1 else r["device"]


def number(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def row(path: Path, r: dict, base: Path) -> str:
    b = r["benchmark"]
    target = "-" if r["target"] is None else ("<= " if b in LOWER_IS_BETTER else ">= ") + number(r["target"])
    link = f"[{path.stem}]({path.relative_to(base).as_posix()})"  # from the README's folder
    cells = [link, setup(r), RATIO_OF.get(b, ""), f"**{number(r['ratio'])}**", target, device(r),
             r["date"][:10], r["commit"][:7]]
    return "| " + " | ".join(cells) + " |"


def render(results: Path = RESULTS) -> str:
    """The table in markdown, one row per headline result file."""
    order = list(RATIO_OF)
    loaded = [(p, json.loads(p.read_text())) for p in sorted(results.glob("*.json"))]
    loaded.sort(key=lambda pr: (order.index(pr[1]["benchmark"]) if pr[1]["benchmark"] in order else len(order),
                                pr[0].name))
    head = ["| result | setup | ratio of | ratio | target | device | date | commit |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return "\n".join(head + [row(p, r, results.parent.parent) for p, r in loaded]) + "\n"


def readme_table(text: str) -> str:
    """The part of a README between the markers."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def with_table(text: str, table: str) -> str:
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    return f"{before}{BEGIN}\n{table}{END}{after}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not the files'")
    mode.add_argument("--print", action="store_true", help="print the table only")
    args = ap.parse_args()
    table = render()
    if args.print:
        print(table, end="")
    elif args.check:
        if readme_table(README.read_text()) != table:
            sys.exit("README.md's results table differs from benchmarks/results/: run python benchmarks/report.py")
    else:
        README.write_text(with_table(README.read_text(), table))
        print(f"{README.name}: results table rewritten ({table.count(chr(10)) - 2} rows)")


if __name__ == "__main__":
    main()
