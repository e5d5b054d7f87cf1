"""ZeroMQ KV transfers under concurrency: ours next to bare pyzmq, two processes.

    python benchmarks/kv_zmq_load.py --device cuda          # -> results/kv_transfer_zmq_load.json
    python benchmarks/kv_zmq_load.py --device cpu --tokens 16 --transfers 32 --out /tmp   # smoke check

This process sends; a child process receives. Each transfer is one prompt's KV
(Llama-3.2-1B shape, 128 tokens: 16 layers of 256 KiB, 4 MiB), one message per layer
plus the finish, C transfers in flight at once (a closed loop: a transfer starts as
another is acknowledged). Ours: ZmqKVManager on both ends; the sender hands host
tensors (what the prefill connector hands over) to ZmqKVSender, the receiver checks
each message (XXH3) and writes it into a real KV cache tensor on --device through the
engine's KVImports (what LLMEngine.write_kv uses at TP 1). Raw: a bare pyzmq
DEALER/ROUTER pair moving the same frames (same sizes and message count, copy=False),
acknowledging each transfer on its last message, nothing checked or written. Both
processes switch threads every 200 us, as the nodes do (--switch-interval-us). Rounds
alternate raw and ours at each concurrency; the best round of each is kept.
ratio = our aggregate GB/s / raw at the highest concurrency (target >= 0.8); at
concurrency 1, latency_ratio = our mean transfer time / raw (target <= 1.5)."""
from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import zmq

from common import SHAPES, write_result
from pdserve.cli import SWITCH_INTERVAL_US
from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.kv_transfer.base.status import TransferState
from pdserve.kv_transfer.zmq.config import ZmqConfig
from pdserve.kv_transfer.zmq.manager import ZmqKVManager

EPOCH = 1


def layout(args) -> KVLayout:
    s = SHAPES[args.shape]
    head_dim = s.get("head_dim", s["hidden_size"] // s["num_attention_heads"])
    return KVLayout.create(args.shape, s["num_hidden_layers"], s["num_key_value_heads"], head_dim, args.block_size,
                           getattr(torch, args.dtype))


def num_blocks(args) -> int:
    return -(-args.tokens // args.block_size)


# receiver (child process): commands on stdin, one JSON answer a line on stdout

def serve(args) -> None:
    from pdserve.engine.kv_cache import KVCache
    from pdserve.engine.kv_import import KVImports
    lay, nb, device = layout(args), num_blocks(args), torch.device(args.device)
    slots = max(args.concurrency)
    kv = KVCache(lay.num_layers, slots * nb, lay.block_size, lay.num_kv_heads, lay.head_dim, lay.dtype, device)

    def check(n, layers):
        want = lay.shard_shape(n, lay.num_kv_heads)
        if any(tuple(t.shape) != want for shards in layers for t in shards):
            raise ValueError(f"KV shard shape, expected {want}")
    imports = KVImports(kv, device, 1, check)
    ours = ZmqKVManager(Role.DECODE, lay, bind_host="127.0.0.1", recv_writers=args.recv_writers)
    ours.start()
    raw = RawReceiver(zmq.Context())
    raw.start()
    receivers = []
    print(json.dumps({"ours": ours.endpoint, "raw": raw.endpoint}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":  # every transfer of a round, transfer i into slot i mod C
            receivers = []
            for i in range(cmd["n"]):
                blocks = list(range((i % cmd["c"]) * nb, (i % cmd["c"] + 1) * nb))
                write = (lambda b: lambda layer, per_rank: imports.write(b, layer, [per_rank]))(blocks)
                receivers.append(ours.expect(f"{cmd['round']}-{i}", EPOCH, blocks, time.time() + 600, write))
            print(json.dumps({"ok": True}), flush=True)
        elif cmd["cmd"] == "check":
            imports.flush()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            states = [rx.wait(60) for rx in receivers]
            errors = sorted({rx.error for rx in receivers if rx.error})
            print(json.dumps({"done": states.count(TransferState.DONE), "errors": errors[:3]}), flush=True)
        else:
            break
    raw.close()
    ours.close()


class RawReceiver:
    """A ROUTER that counts each transfer's messages and acknowledges its last one."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            while True:
                try:
                    parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                tid, _, last = parts[1].bytes.partition(b"|")
                if last == b"1":
                    self.sock.send_multipart([parts[0], tid])
        self.sock.close(linger=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.ctx.term()


# sender (this process)

def run_ours(pre: ZmqKVManager, endpoint: str, layers: list[torch.Tensor], round_id: str, n: int,
             c: int) -> list[float]:
    """Send n transfers, c in flight; each transfer's seconds from its first send to its ack."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    started: dict[int, float] = {}
    times: list[float] = []

    def start(i: int) -> None:
        tx = pre.sender(endpoint, f"{round_id}-{i}", EPOCH, layers[0].shape[1])
        started[i] = time.perf_counter()
        tx.status.on_end(lambda: done.put((i, time.perf_counter(), tx)))
        for layer, t in enumerate(layers):
            tx.send_layers(layer, [[t]])
        tx.finish(1)
    for i in range(min(c, n)):
        start(i)
    for k in range(n):
        i, end, tx = done.get(timeout=120)
        if tx.state != TransferState.DONE:
            raise RuntimeError(f"transfer {i} failed: {tx.error}")
        times.append(end - started[i])
        if k + c < n:
            start(k + c)
    return times


def run_raw(sock: zmq.Socket, layers: list[torch.Tensor], header_bytes: int, round_id: str, n: int,
            c: int) -> list[float]:
    """The same frames through a bare DEALER: one message per layer [header, frame], then the finish."""
    frames = [memoryview(t.view(torch.uint8).reshape(-1).numpy()) for t in layers]
    pad = b" " * header_bytes
    started: dict[bytes, float] = {}
    times: list[float] = []

    def start(i: int) -> None:
        tid = f"{round_id}-{i}".encode()
        started[tid] = time.perf_counter()
        for f in frames:
            sock.send_multipart([tid + b"|0" + pad, f], copy=False)
        sock.send_multipart([tid + b"|1"])
    for i in range(min(c, n)):
        start(i)
    sent = min(c, n)
    while len(times) < n:
        if not sock.poll(120_000):
            raise RuntimeError("raw: no ack in 120 s")
        tid = sock.recv()
        times.append(time.perf_counter() - started.pop(tid))
        if sent < n:
            start(sent)
            sent += 1
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128, help="prompt tokens a transfer's KV holds")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--transfers", type=int, default=256, help="transfers per round (at least 4 per slot)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of raw and ours per concurrency")
    ap.add_argument("--recv-writers", type=int, default=ZmqConfig().recv_writers,
                    help="the receiver's writer threads (--kv-recv-writers)")
    ap.add_argument("--out", default=None, help="write the result JSON into this folder instead of results/")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.setswitchinterval(SWITCH_INTERVAL_US * 1e-6)  # what the nodes run with, both ends
    if args.serve:
        serve(args)
        return
    lay, nb = layout(args), num_blocks(args)
    child = subprocess.Popen([sys.executable, __file__, "--serve", *sys.argv[1:]], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)

    def ask(**cmd) -> dict:
        child.stdin.write(json.dumps(cmd) + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())
    try:
        ends = json.loads(child.stdout.readline())
        pin = args.device.startswith("cuda")
        layers = [torch.randn(lay.shard_shape(nb, lay.num_kv_heads)).to(lay.dtype) for _ in range(lay.num_layers)]
        layers = [t.pin_memory() if pin else t for t in layers]
        nbytes = sum(t.nbytes for t in layers)
        pre = ZmqKVManager(Role.PREFILL, lay)
        pre.start()
        ctx = zmq.Context()
        raw_sock = ctx.socket(zmq.DEALER)  # one connection for every round, as ours keeps its socket
        raw_sock.setsockopt(zmq.LINGER, 0)
        raw_sock.setsockopt(zmq.SNDHWM, 0)
        raw_sock.connect(ends["raw"])
        header_bytes = 120  # about what our KVHeader of one layer takes
        levels = []
        for c in args.concurrency:
            n = max(args.transfers, 4 * c)
            best = {"ours": None, "raw": None}
            for r in range(args.rounds):
                round_id = f"c{c}r{r}"
                t0 = time.perf_counter()
                raw = run_raw(raw_sock, layers, header_bytes, round_id, n, c)
                raw_s = time.perf_counter() - t0
                assert ask(cmd="expect", round=round_id, n=n, c=c)["ok"]
                t0 = time.perf_counter()
                ours = run_ours(pre, ends["ours"], layers, round_id, n, c)
                ours_s = time.perf_counter() - t0
                check = ask(cmd="check")
                if check["done"] != n:
                    raise RuntimeError(f"receiver: {check['done']} of {n} transfers done: {check['errors']}")
                for name, total, times in (("raw", raw_s, raw), ("ours", ours_s, ours)):
                    m = dict(gbps=n * nbytes / total / 1e9, mean_ms=1e3 * sum(times) / len(times),
                             p50_ms=1e3 * sorted(times)[len(times) // 2], transfers_per_s=n / total)
                    if best[name] is None or m["gbps"] > best[name]["gbps"]:
                        best[name] = m
            level = dict(concurrency=c, transfers=n, ours=best["ours"], raw=best["raw"],
                         ratio=best["ours"]["gbps"] / best["raw"]["gbps"],
                         latency_ratio=best["ours"]["mean_ms"] / best["raw"]["mean_ms"])
            levels.append(level)
            print(f"C={c:3d}: ours {best['ours']['gbps']:.2f} GB/s ({best['ours']['transfers_per_s']:.0f}/s, "
                  f"{best['ours']['mean_ms']:.2f} ms), raw {best['raw']['gbps']:.2f} GB/s "
                  f"({best['raw']['mean_ms']:.2f} ms): ratio {level['ratio']:.2f}, "
                  f"latency ours/raw {level['latency_ratio']:.2f}", flush=True)
        pre.close()
        raw_sock.close(linger=0)
        ctx.term()
        child.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
        child.stdin.close()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    top = levels[-1]
    c1 = next((x for x in levels if x["concurrency"] == 1), None)
    config = dict(shape=args.shape, dtype=args.dtype, tokens=args.tokens, block_size=args.block_size,
                  transfer_mib=nbytes / 2**20, kv_device=args.device, endpoint="tcp",
                  concurrency=args.concurrency, rounds=args.rounds, recv_writers=args.recv_writers,
                  headline_concurrency=top["concurrency"])
    path = write_result("kv_transfer_zmq_load", "kv_transfer_zmq_load", top["ratio"], 0.8, config,
                        args.commit, folder=Path(args.out) if args.out else None,
                        latency_ratio_c1=None if c1 is None else round(c1["latency_ratio"], 4),
                        latency_target=1.5, levels=levels)
    print(f"ratio {top['ratio']:.3f} at C={top['concurrency']} -> {path}")


if __name__ == "__main__":
    main()
