"""Exposed KV transfer time: TTFT of a 1 prefill + 1 decode cluster against prefill alone.

    python benchmarks/kv_exposed.py [--shape llama-3.2-1b] [--prompt-len 2048] [--requests 20] [--rounds 4] [--paired]
    CUDA_VISIBLE_DEVICES=0 python benchmarks/kv_exposed.py --transport cuda-ipc   # kv_transfer_exposed_ipc

--transport cuda-ipc: the 1P1D cluster is both nodes on the one GPU (pdserve up shares it:
the prefill node starts first with --gpu-memory-utilization 0.3), the KV copied into the
decode node's blocks over CUDA IPC; target <= 1.02, result kv_transfer_exposed_ipc.

At concurrency 1, the same 2K-token prompts (random ids, random bf16 weights of the
shape) go through 1P1D over NCCL (prefill on GPU 0, decode on GPU 1) and through one
colocated node on GPU 0 (prefill alone: the same coordinator, reservation and prefill
RPCs, and no transfer at all).

Method (the headline): alternating rounds, after a warm-up round of both that is not
kept (a fresh machine's first cluster can run slower than every later one). In each
round a fresh 1P1D cluster and a fresh colocated node take their share of the prompts
one after the other, never up together, 1P1D first in even rounds: each is measured
as it is deployed, with its GPUs to itself, while a drift of the host between runs
and the spread between fresh processes land on both sides. ratio = median TTFT(1P1D, NCCL)
over every round / median TTFT(prefill alone) over every round; target <= 1.05 (the
transfer adds at most 5%). Each round's own ratio is reported beside it.

--paired adds the earlier method: both clusters up at once (the 1P1D prefill node and
the colocated node then share GPU 0), each prompt sent to one then the other. Then
1P1D over ZeroMQ, alone, for comparison (the portable path; --skip-zmq leaves it out).

TTFT is the client's time from sending the request to receiving the first token. Each
row also cuts it at the coordinator's and nodes' timestamps (split_ms, medians):
client -> coordinator, reservation, -> prefill node, the node's prefill (for 1P1D it
ends once the first token is out; the sends may still run), node -> coordinator (for
1P1D: until the node saw every send complete), coordinator -> client."""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from common import hf_config, write_config_folder, write_result
from pdserve.cli import SWITCH_INTERVAL_US
from pdserve.cluster import Cluster, ClusterConfig, free_port
from pdserve.v1 import api_pb2, api_pb2_grpc


SPLIT = ("client_to_coordinator", "reserve", "to_prefill_node", "node_prefill", "node_to_coordinator",
         "coordinator_to_client")  # TTFT's steps, between the timestamps in PhaseTimes


class Target:
    """One cluster, up, taking one request at a time."""

    def __init__(self, name: str, pools: dict, a: argparse.Namespace, model: str):
        self.name, self.samples = name, []   # (ttft, server prefill, server transfer after prefill) per request
        self.splits: list[list[float]] = []   # per request: TTFT cut into SPLIT's steps
        self.listen = f"127.0.0.1:{free_port()}"
        log_dir = Path(a.log_dir) / name.replace(" ", "_") if a.log_dir else Path(tempfile.mkdtemp())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(ClusterConfig(listen=self.listen, model=model, device=a.device, load_format="dummy",
                                             max_num_batched_tokens=max(2048, a.prompt_len), log_dir=str(log_dir),
                                             cores_per_member=a.cores_per_member,
                                             switch_interval_us=a.switch_interval_us, **pools))
        self.cluster.start()
        self.channel = grpc.insecure_channel(self.listen)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)

    def one(self, prompt: list[int], keep: bool) -> None:
        req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        req.token_ids.ids.extend(prompt)
        wall = time.time()
        sent, first, times = time.perf_counter(), None, None
        for resp in self.stub.Generate(req, timeout=60):
            if resp.token_ids and first is None:
                first = time.perf_counter()
            if resp.finish_reason:
                times = resp.times
        if keep:
            self.samples.append((first - sent, times.prefill_end - times.prefill_start,
                                 times.transfer_end - times.prefill_end if times.transfer_end else 0.0))
            # TTFT cut at the timestamps the coordinator and the nodes took (one clock: one host)
            cuts = (wall, times.received, times.reserved, times.prefill_start, times.prefill_end, times.first_token,
                    wall + (first - sent))
            self.splits.append([b - a for a, b in zip(cuts, cuts[1:])])

    def close(self) -> None:
        self.channel.close()
        self.cluster.stop()

    def row(self) -> dict:
        return summarize(self.name, self.samples, self.splits)


def summarize(name: str, samples: list[tuple], splits: list[list[float]]) -> dict:
    ttfts, prefill, transfer = zip(*samples)
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    row = dict(name=name, ttft_ms=med(ttfts), ttft_p90_ms=sorted(ttfts)[int(0.9 * (len(ttfts) - 1))] * 1e3,
               server_prefill_ms=med(prefill), server_transfer_ms=med(transfer), requests=len(ttfts),
               split_ms={k: round(med(v), 4) for k, v in zip(SPLIT, zip(*splits))})
    print(f"{name:22s} TTFT median {row['ttft_ms']:7.2f} ms (p90 {row['ttft_p90_ms']:7.2f})   server: "
          f"prefill {row['server_prefill_ms']:6.2f} ms, transfer after prefill {row['server_transfer_ms']:6.2f} ms",
          flush=True)
    print("    split: " + ", ".join(f"{k} {v:.3f}" for k, v in row["split_ms"].items()), flush=True)
    return row


def run_alone(name: str, pools: dict, a: argparse.Namespace, model: str, prompts: list[list[int]],
              keep: bool = True) -> Target:
    """One cluster alone, started and stopped here: its requests one after the other, the
    first a.warmup not kept (none kept when keep is False)."""
    t = Target(name, pools, a, model)
    try:
        for i, prompt in enumerate(prompts):
            t.one(prompt, keep=keep and i >= a.warmup)
    finally:
        t.close()
    return t


def measure(name: str, pools: dict, a: argparse.Namespace, model: str, prompts: list[list[int]]) -> dict:
    return run_alone(name, pools, a, model, prompts).row()


def paired(targets: list[Target], a: argparse.Namespace, prompts: list[list[int]]) -> None:
    """The targets up together (1P1D's prefill and the colocated node share GPU 0), each
    prompt going to each in turn, the order alternating: drifts of the host (its clock,
    its other load) between runs land on both sides alike."""
    for i, prompt in enumerate(prompts):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            t.one(prompt, keep=i >= a.warmup)


NCCL_POOLS = dict(prefill=1, decode=1, kv_transport="nccl")
IPC_POOLS = dict(prefill=1, decode=1, kv_transport="cuda-ipc")
ALONE_POOLS = dict(prefill=0, decode=0, colocated=1)


def alternating_rounds(a: argparse.Namespace, model: str, prompts: list[list[int]],
                       kinds: dict | None = None) -> tuple[dict, dict, list[float]]:
    """a.rounds rounds; in each, a fresh 1P1D cluster and a fresh colocated node (or the two
    kinds given), one after the other and never up together (the order alternating: the
    first kind first in even rounds), each taking a.warmup + its share of the prompts.
    Returns both rows (every round's requests) and each round's ratio of medians."""
    kinds = kinds or {"1P1D nccl": NCCL_POOLS, "prefill alone": ALONE_POOLS}
    names = tuple(kinds)
    kept = {n: ([], []) for n in names}
    per_round = []
    share = -(-a.requests // a.rounds)
    if a.warmup_round:  # a fresh machine's first cluster may run slower: not kept
        for name in names:
            run_alone(name, kinds[name], a, model, prompts[:a.warmup + share], keep=False)
        print("warm-up round done (not kept)", flush=True)
    for r in range(a.rounds):
        chunk = prompts[:a.warmup] + prompts[a.warmup + r * share:a.warmup + (r + 1) * share]
        medians = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            t = run_alone(name, kinds[name], a, model, chunk)
            kept[name][0].extend(t.samples)
            kept[name][1].extend(t.splits)
            medians[name] = statistics.median(x[0] for x in t.samples)
        per_round.append(round(medians[names[0]] / medians[names[1]], 4))
        print(f"round {r}: ratio {per_round[-1]:.3f}", flush=True)
    nccl, alone = (summarize(n, *kept[n]) for n in names)
    return nccl, alone, per_round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=20, help="measured requests per cluster kind (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="requests not measured at the start of each cluster")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (the headline method)")
    ap.add_argument("--no-warmup-round", dest="warmup_round", action="store_false",
                    help="skip the first round of both clusters that is run and not kept")
    ap.add_argument("--cores-per-member", type=int, default=0,
                    help="pin each cluster member to its own physical cores, this many (0: the OS places them)")
    ap.add_argument("--switch-interval-us", type=float, default=None,
                    help="every cluster member's --switch-interval-us (default: the nodes' own)")
    ap.add_argument("--paired", action="store_true",
                    help="also measure both clusters up at once, each prompt to each in turn (reported beside)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-zmq", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--log-dir", default=None, help="keep the cluster members' logs here")
    ap.add_argument("--result-name", default=None, help="result file name (variants of a run; default: the benchmark)")
    ap.add_argument("--transport", default="nccl", choices=["nccl", "cuda-ipc"], help="the 1P1D cluster's KV transport")
    ap.add_argument("--graphs-ab", action="store_true",
                    help="one GPU: instead, the colocated node with prefill CUDA graphs against the same node with "
                         "eager prefill steps (result prefill_graphs_ttft)")
    ap.add_argument("--variants", nargs="*", default=[], metavar="MIB:CTAS",
                    help="more NCCL clusters with these --kv-min-message-mib and --kv-max-ctas, each measured "
                         "alone once (reported beside; the ratio is the nodes' defaults')")
    a = ap.parse_args()
    vocab = hf_config(a.shape).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt_len)] for _ in range(a.requests + a.warmup)]
    paired_row = None
    if a.graphs_ab:
        graphs_ab(a, prompts)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_config_folder(a.shape, Path(tmp) / a.shape))
        pools = NCCL_POOLS if a.transport == "nccl" else IPC_POOLS
        nccl, alone, per_round = alternating_rounds(a, model, prompts,
                                                    {f"1P1D {a.transport}": pools, "prefill alone": ALONE_POOLS})
        if a.paired:
            pair = [Target(f"paired 1P1D {a.transport}", pools, a, model)]
            try:
                pair.append(Target("paired prefill alone", ALONE_POOLS, a, model))
                paired(pair, a, prompts)
            finally:
                for t in pair:
                    t.close()
            rows = [t.row() for t in pair]
            paired_row = dict(ratio=round(rows[0]["ttft_ms"] / rows[1]["ttft_ms"], 4), nccl=rows[0],
                              prefill_alone=rows[1], median_per_prompt_ratio=round(statistics.median(
                                  n[0] / p[0] for n, p in zip(pair[0].samples, pair[1].samples)), 4))
        zmq = None if a.skip_zmq else measure("1P1D zmq", dict(prefill=1, decode=1, kv_transport="zmq"), a, model,
                                              prompts)
        variants = []
        for v in a.variants:
            mib, ctas = v.split(":")
            row = measure(f"1P1D nccl {mib} MiB {ctas} CTAs", dict(NCCL_POOLS, kv_min_message_mib=float(mib),
                          kv_max_ctas=int(ctas)), a, model, prompts)
            variants.append(dict(row, kv_min_message_mib=float(mib), kv_max_ctas=int(ctas)))
    ratio = nccl["ttft_ms"] / alone["ttft_ms"]
    print(f"per round: {per_round}")
    if paired_row:
        print(f"paired (both up at once): ratio {paired_row['ratio']:.3f}, "
              f"median per-prompt ratio {paired_row['median_per_prompt_ratio']:.3f}")
    for v in variants:
        print(f"  variant {v['name']}: ratio {v['ttft_ms'] / alone['ttft_ms']:.3f}")
    bench, target = ("kv_transfer_exposed", 1.05) if a.transport == "nccl" else ("kv_transfer_exposed_ipc", 1.02)
    print(f"ratio TTFT(1P1D {a.transport}) / TTFT(prefill alone): {ratio:.3f}  target <= {target}")
    from pdserve.kv_transfer.nccl.config import NcclConfig
    node = NcclConfig()
    config = dict(shape=a.shape, prompt_len=a.prompt_len, requests=a.requests, warmup=a.warmup, concurrency=1,
                  rounds=a.rounds, warmup_round=a.warmup_round, cores_per_member=a.cores_per_member,
                  switch_interval_us=a.switch_interval_us or SWITCH_INTERVAL_US,
                  method="alternating rounds: in each, a fresh 1P1D cluster and a fresh colocated node, one at a "
                  "time, the order alternating, after a warm-up round not kept; ratio of the medians over all rounds",
                  dtype="bfloat16", device=a.device, kv_min_message_mib=node.min_message_mib,
                  kv_max_ctas=node.max_ctas, kv_transport=a.transport)
    path = write_result(a.result_name or bench, bench, ratio, target, config, commit_id=a.commit,
                        **{a.transport.replace("-", "_"): nccl}, zmq=zmq, prefill_alone=alone, per_round_ratio=per_round, paired=paired_row,
                        variants=variants, exposed_ms=nccl["ttft_ms"] - alone["ttft_ms"])
    print(f"-> {path}")


def graphs_ab(a: argparse.Namespace, prompts: list[list[int]]) -> None:
    """TTFT at concurrency 1 of one colocated node replaying prefill CUDA graphs against the
    same node running prefill steps eagerly (alternating rounds, as the headline)."""
    kinds = {"prefill alone, graphs": ALONE_POOLS, "prefill alone, eager": dict(ALONE_POOLS, prefill_graphs=False)}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_config_folder(a.shape, Path(tmp) / a.shape))
        graphs, eager, per_round = alternating_rounds(a, model, prompts, kinds)
    ratio = graphs["ttft_ms"] / eager["ttft_ms"]
    print(f"per round: {per_round}")
    print(f"ratio TTFT(prefill graphs) / TTFT(eager prefill): {ratio:.3f}")
    config = dict(shape=a.shape, prompt_len=a.prompt_len, requests=a.requests, warmup=a.warmup, concurrency=1,
                  rounds=a.rounds, warmup_round=a.warmup_round, dtype="bfloat16", device=a.device,
                  method="alternating rounds of a fresh colocated node with and without prefill CUDA graphs, one "
                  "at a time; ratio of the medians over all rounds (< 1: the graphs cut TTFT)")
    path = write_result("prefill_graphs_ttft", "prefill_graphs_ttft", ratio, 1.0, config, commit_id=a.commit,
                        graphs=graphs, eager=eager, per_round_ratio=per_round)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
