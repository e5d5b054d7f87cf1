"""Exposed KV transfer time: TTFT of a 1 prefill + 1 decode cluster against prefill alone.

    python benchmarks/kv_exposed.py [--shape llama-3.2-1b] [--prompt-len 2048] [--requests 20]

At concurrency 1, the same 2K-token prompts (random ids, random bf16 weights of the
shape) go through:
- 1P1D over NCCL (prefill on GPU 0, decode on GPU 1) and one colocated node on GPU 0
  (prefill alone: the same coordinator, reservation and prefill RPCs, and no transfer
  at all), both up at once, each prompt sent to one then the other, the order
  alternating (paired: a drift of the host between runs, worth several percent of
  TTFT run to run, lands on both);
- then 1P1D over ZeroMQ (for comparison: the portable path), alone.
TTFT is the client's time from sending the request to receiving the first token.
ratio = median TTFT(1P1D, NCCL) / median TTFT(prefill alone); target <= 1.05 (the
transfer adds at most 5%). The server's own split (prefill, transfer) is reported
beside it."""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402

from benchmarks.common import hf_config, write_config_folder, write_result  # noqa: E402
from pdserve.cluster import Cluster, ClusterConfig, free_port  # noqa: E402
from pdserve.v1 import api_pb2, api_pb2_grpc  # noqa: E402


class Target:
    """One cluster, up, taking one request at a time."""

    def __init__(self, name: str, pools: dict, a: argparse.Namespace, model: str):
        self.name, self.samples = name, []   # (ttft, server prefill, server transfer after prefill) per request
        self.listen = f"127.0.0.1:{free_port()}"
        log_dir = Path(a.log_dir) / name.replace(" ", "_") if a.log_dir else Path(tempfile.mkdtemp())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(ClusterConfig(listen=self.listen, model=model, device=a.device, load_format="dummy",
                                             max_num_batched_tokens=max(2048, a.prompt_len), log_dir=str(log_dir),
                                             **pools))
        self.cluster.start()
        self.channel = grpc.insecure_channel(self.listen)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)

    def one(self, prompt: list[int], keep: bool) -> None:
        req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        req.token_ids.ids.extend(prompt)
        sent, first, times = time.perf_counter(), None, None
        for resp in self.stub.Generate(req, timeout=60):
            if resp.token_ids and first is None:
                first = time.perf_counter()
            if resp.finish_reason:
                times = resp.times
        if keep:
            self.samples.append((first - sent, times.prefill_end - times.prefill_start,
                                 times.transfer_end - times.prefill_end if times.transfer_end else 0.0))

    def close(self) -> None:
        self.channel.close()
        self.cluster.stop()

    def row(self) -> dict:
        ttfts, prefill, transfer = zip(*self.samples)
        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        row = dict(name=self.name, ttft_ms=med(ttfts), ttft_p90_ms=sorted(ttfts)[int(0.9 * (len(ttfts) - 1))] * 1e3,
                   server_prefill_ms=med(prefill), server_transfer_ms=med(transfer), requests=len(ttfts))
        print(f"{self.name:22s} TTFT median {row['ttft_ms']:7.2f} ms (p90 {row['ttft_p90_ms']:7.2f})   server: "
              f"prefill {row['server_prefill_ms']:6.2f} ms, transfer after prefill {row['server_transfer_ms']:6.2f} ms",
              flush=True)
        return row


def measure(name: str, pools: dict, a: argparse.Namespace, model: str, prompts: list[list[int]]) -> dict:
    """One cluster alone: its requests one after the other."""
    t = Target(name, pools, a, model)
    try:
        for i, prompt in enumerate(prompts):
            t.one(prompt, keep=i >= a.warmup)
    finally:
        t.close()
    return t.row()


def paired(targets: list[Target], a: argparse.Namespace, prompts: list[list[int]]) -> None:
    """The targets up together (1P1D's prefill and the colocated node share GPU 0), each
    prompt going to each in turn, the order alternating: drifts of the host (its clock,
    its other load) between runs land on both sides alike."""
    for i, prompt in enumerate(prompts):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            t.one(prompt, keep=i >= a.warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-zmq", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--log-dir", default=None, help="keep the cluster members' logs here")
    ap.add_argument("--result-name", default="kv_transfer_exposed", help="result file name (variants of a run)")
    ap.add_argument("--variants", nargs="*", default=[], metavar="MIB:CTAS",
                    help="more NCCL clusters with these --kv-min-message-mib and --kv-max-ctas (reported beside; "
                         "the ratio is the nodes' defaults')")
    a = ap.parse_args()
    vocab = hf_config(a.shape).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt_len)] for _ in range(a.requests + a.warmup)]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_config_folder(a.shape, Path(tmp) / a.shape))
        pair = [Target("1P1D nccl", dict(prefill=1, decode=1, kv_transport="nccl"), a, model)]
        try:
            pair.append(Target("prefill alone", dict(prefill=0, decode=0, colocated=1), a, model))
            paired(pair, a, prompts)
        finally:
            for t in pair:
                t.close()
        nccl, alone = (t.row() for t in pair)
        pairs = [n[0] / p[0] for n, p in zip(pair[0].samples, pair[1].samples)]
        zmq = None if a.skip_zmq else measure("1P1D zmq", dict(prefill=1, decode=1), a, model, prompts)
        variants = []
        for v in a.variants:
            mib, ctas = v.split(":")
            row = measure(f"1P1D nccl {mib} MiB {ctas} CTAs", dict(prefill=1, decode=1, kv_transport="nccl",
                          kv_min_message_mib=float(mib), kv_max_ctas=int(ctas)), a, model, prompts)
            variants.append(dict(row, kv_min_message_mib=float(mib), kv_max_ctas=int(ctas)))
    ratio = nccl["ttft_ms"] / alone["ttft_ms"]
    print(f"median of the per-prompt ratios: {statistics.median(pairs):.3f}")
    for v in variants:
        print(f"  variant {v['name']}: ratio {v['ttft_ms'] / alone['ttft_ms']:.3f}")
    print(f"ratio TTFT(1P1D nccl) / TTFT(prefill alone): {ratio:.3f}  target <= 1.05")
    from engine.config import EngineConfig
    node = EngineConfig()
    config = dict(shape=a.shape, prompt_len=a.prompt_len, requests=a.requests, warmup=a.warmup, concurrency=1,
                  method="paired: both clusters up, each prompt to each in turn, alternating order",
                  dtype="bfloat16", device=a.device, kv_min_message_mib=node.kv_min_message_mib,
                  kv_max_ctas=node.kv_max_ctas)
    path = write_result(a.result_name, "kv_transfer_exposed", ratio, 1.05, config, commit_id=a.commit,
                        nccl=nccl, zmq=zmq, prefill_alone=alone, variants=variants,
                        exposed_ms=nccl["ttft_ms"] - alone["ttft_ms"],
                        median_paired_ratio=round(statistics.median(pairs), 4))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
