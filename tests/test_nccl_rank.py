"""RankKV, the NCCL KV transport's per-rank data mover, between real processes over gloo
on loopback (the same code path as NCCL but for the streams): whole and re-sliced heads
(TP 1 -> 2, TP 2 -> 1), shuffled block ids, queued transfers, multi-message layer
groups, checksum and key mismatches, a peer that dies or goes silent, pairs rebuilt.
The scenarios take a Setup; tests/gpu/test_gpu_nccl_rank.py runs them over NCCL."""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pdserve.kv_transfer.base.layout import kv_head_range
from pdserve.kv_transfer.nccl.pairs import pair_slices
from pdserve.kv_transfer.nccl.store import serve_store
from pdserve.kv_transfer.nccl.verify import checksum, layer_groups
from tests.nccl_rank_peer import cache_contents

ROOT = Path(__file__).resolve().parent.parent
LAYERS, BLOCK, HEAD_DIM, HEADS, BLOCKS = 5, 4, 8, 4, 24   # HEADS: the model's KV heads


@dataclass(frozen=True)
class Setup:
    """Where the ranks run and what the cache holds."""
    dtype: str = "float32"
    prefill_device: str = "cpu"
    decode_device: str = "cpu"
    forward: bool = False    # GPU: the sender's cache fills layer by layer (events) while send() is issued
    sees_death: bool = True  # gloo notices a dead peer at once; NCCL between GPUs only by the timeout

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def min_message(self) -> int:
        """1.5 layers of a 5-block transfer of all heads: two layers per message, several messages."""
        return 3 * 5 * BLOCK * HEADS * HEAD_DIM * self.torch_dtype.itemsize


CPU = Setup()


class Peer:
    """A tests.nccl_rank_peer process: its JSON events arrive on a queue."""

    def __init__(self, cfg: dict, tmp: Path, name: str, env: dict | None = None):
        self.name, self.events = name, queue.Queue()
        self.err_path = tmp / f"{name}.stderr"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.nccl_rank_peer", json.dumps(cfg)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err_path.open("w"),
                                     text=True, env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
                                         [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put({"event": "exit"})

    def expect(self, event: str, timeout: float = 60, **match) -> dict:
        """The next event named `event` (matching `match`); earlier ones are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no {event} {match} in {timeout} s\n{self.stderr()}") from None
            if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                return e
            if e["event"] == "exit":
                raise AssertionError(f"{self.name} exited (rc {self.proc.wait()}) before {event}\n{self.stderr()}")

    def results(self, keys: list[int], timeout: float = 60) -> dict[int, dict]:
        """The result of each key, in whatever order they come."""
        deadline, out = time.monotonic() + timeout, {}
        while len(out) < len(keys):
            e = self.expect("result", max(0.01, deadline - time.monotonic()))
            if e["key"] in keys:
                out[e["key"]] = e
        return out

    def resume(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> None:
        self.expect("done", timeout)
        assert self.proc.wait(timeout) == 0, self.stderr()

    def stderr(self) -> str:
        return self.err_path.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def store():
    st, port = serve_store()
    yield port
    del st


@pytest.fixture
def peers(tmp_path):
    started: list[Peer] = []

    def start(name: str, **cfg) -> Peer:
        started.append(Peer(cfg, tmp_path, name))
        return started[-1]
    yield start
    for p in started:
        p.kill()


def cfg(setup: Setup, prefill: bool, port: int, heads: int, seed: int | None, ops: list[dict],
        timeout: float = 20) -> dict:
    return dict(device=setup.prefill_device if prefill else setup.decode_device, dtype=setup.dtype, layers=LAYERS,
                blocks=BLOCKS, block_size=BLOCK, heads=heads, head_dim=HEAD_DIM, seed=seed,
                store=["127.0.0.1", port], timeout=timeout, min_message_bytes=setup.min_message, ops=ops,
                forward=setup.forward and prefill)


def contents(setup: Setup, seed: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cache_contents(seed, LAYERS, BLOCKS, BLOCK, heads, HEAD_DIM, setup.torch_dtype)


def load_dump(setup: Setup, path: Path, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8)).view(setup.torch_dtype)
    k, v = raw.view(2, LAYERS, BLOCKS, BLOCK, heads, HEAD_DIM)
    return k, v


def shuffled_blocks(rng: random.Random, n: int, taken: set[int]) -> list[int]:
    """n distinct block ids in random order, none taken before, not one contiguous run."""
    ids = rng.sample(sorted(set(range(BLOCKS)) - taken), n)
    taken.update(ids)
    assert ids != list(range(min(ids), min(ids) + n))
    return ids


def two_transfers(rng: random.Random) -> list[list[int]]:
    """Block ids of two transfers from one rank: shuffled, disjoint."""
    taken: set[int] = set()
    return [shuffled_blocks(rng, 6, taken), shuffled_blocks(rng, 6, taken)]


def assert_heads(got: tuple, got_blocks: list[int], got_head: int, want: tuple, want_blocks: list[int],
                 want_head: int, heads: int) -> None:
    for g, w in zip(got, want):  # k, then v
        a = g[:, got_blocks, :, got_head:got_head + heads]
        b = w[:, want_blocks, :, want_head:want_head + heads]
        assert b.abs().sum() > 0  # random data: a zero cache could not pass
        assert torch.equal(a, b)


def assert_untouched(got: tuple, blocks: set[int], heads: range | None = None) -> None:
    """The cache is still zero outside the blocks (and heads) written."""
    for g in got:
        rest = [b for b in range(BLOCKS) if b not in blocks]
        assert not g[:, rest].any()
        if heads is not None:
            assert not g[:, sorted(blocks)][:, :, :, [h for h in range(g.shape[3]) if h not in heads]].any()


def test_layer_groups_and_checksum():
    assert layer_groups(32, 16 << 20, 64 << 20) == [(i, i + 4) for i in range(0, 32, 4)]  # Llama-3.1-8B, 4K
    assert layer_groups(16, 4 << 20, 64 << 20) == [(0, 16)]                                # Llama-3.2-1B, 2K
    assert layer_groups(7, 100, 250) == [(0, 4), (4, 7)]  # each group >= 250 bytes, the sizes balanced
    assert layer_groups(3, 100, 0) == [(0, 1), (1, 2), (2, 3)]
    assert layer_groups(3, 100, 10_000) == [(0, 3)]
    # at most 8 messages; the first and the last the smallest allowed (the ends nothing overlaps), the rest even
    assert layer_groups(32, 16 << 20, 16 << 20) == [(0, 1), *[(i, i + 5) for i in range(1, 31, 5)], (31, 32)]
    assert layer_groups(10, 100, 200, max_messages=4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert layer_groups(16, 4 << 20, 16 << 20) == [(i, i + 4) for i in range(0, 16, 4)]
    assert layer_groups(30, 1, 0, max_messages=4) == [(0, 1), (1, 15), (15, 29), (29, 30)]
    assert layer_groups(31, 1, 0, max_messages=5) == [(0, 1), (1, 11), (11, 21), (21, 30), (30, 31)]
    assert layer_groups(30, 1, 0, max_messages=2) == [(0, 15), (15, 30)]  # two: even
    buf = torch.randn(2, 2, 3, 4, 2, 8)
    base = checksum(buf)
    assert base.shape == (2,) and base.dtype == torch.int64
    swapped = buf.clone()
    swapped[:, :, [0, 1]] = buf[:, :, [1, 0]]  # two blocks in the wrong order
    kv_swapped = buf.flip(1)
    flipped = buf.clone()
    flipped.view(torch.int32)[0, 0, 0, 0, 0, 0] ^= 1
    for other in (swapped, kv_swapped, flipped):
        assert not torch.equal(checksum(other)[0], base[0])
    bf = torch.randn(1, 2, 1, 1, 1, 3).to(torch.bfloat16)  # rows of 6 bytes: int16 words
    assert checksum(bf).shape == (1,)


def test_one_to_one_queued_shuffled_multi_message_and_integrity(store, peers, tmp_path):
    one_to_one(CPU, store, peers, tmp_path)


def one_to_one(setup: Setup, store: int, peers, tmp_path: Path) -> None:
    rng, taken_s, taken_r = random.Random(1), set(), set()
    ks = {name: shuffled_blocks(rng, n, taken_s) for name, n in [("a", 5), ("b", 7), ("c", 4), ("d", 4), ("e", 3)]}
    kr = {name: shuffled_blocks(rng, len(ks[name]), taken_r) for name in ks}
    layer_bytes = 2 * 5 * BLOCK * HEADS * HEAD_DIM * setup.torch_dtype.itemsize
    assert len(layer_groups(LAYERS, layer_bytes, setup.min_message)) >= 2  # several messages
    full = [["p", 0, HEADS]]
    # keys 1 and 2 leave from one forward (GPU: the layer hooks queue both on one pair, 1's messages first)
    send = [dict(op="step", sends=[dict(key=1, blocks=ks["a"], parts=full), dict(key=2, blocks=ks["b"], parts=full)]),
            dict(op="send", key=3, blocks=ks["c"], parts=full, corrupt=True),
            dict(op="send", key=4, blocks=ks["d"], parts=full),
            dict(op="send", key=6, blocks=ks["e"], parts=[["p", 1, 2]])]  # sender heads 1-2 ...
    recv = [dict(op="recv", key=1, blocks=kr["a"], parts=full), dict(op="recv", key=2, blocks=kr["b"], parts=full),
            dict(op="recv", key=3, blocks=kr["c"], parts=full),
            dict(op="recv", key=5, blocks=kr["d"], parts=full),  # the sender sends key 4 here
            dict(op="recv", key=6, blocks=kr["e"], parts=[["p", 2, 2]])]  # ... into receiver heads 2-3
    dump = tmp_path / "r.bin"
    s = peers("sender", **cfg(setup, True, store, HEADS, 7, [dict(op="open", pair="p", index=0), *send,
                                                              dict(op="wait", keys=[1, 2, 3, 4, 6])]))
    r = peers("receiver", **cfg(setup, False, store, HEADS, None, [dict(op="open", pair="p", index=1), *recv,
                                                                   dict(op="wait", keys=[1, 2, 3, 5, 6]),
                                                                   dict(op="dump", path=str(dump))]))
    sent = s.results([1, 2, 3, 4, 6])
    got = r.results([1, 2, 3, 5, 6])
    s.finish()
    r.finish()
    assert all(e["ok"] for e in sent.values()), sent
    assert got[1]["ok"] and got[2]["ok"] and got[6]["ok"], got
    assert not got[3]["ok"] and "checksum mismatch" in got[3]["error"], got[3]
    assert not got[5]["ok"] and "key 4" in got[5]["error"], got[5]
    want, cache = contents(setup, 7, HEADS), load_dump(setup, dump, HEADS)
    assert_heads(cache, kr["a"], 0, want, ks["a"], 0, HEADS)
    assert_heads(cache, kr["b"], 0, want, ks["b"], 0, HEADS)
    assert_heads(cache, kr["e"], 2, want, ks["e"], 1, 2)
    assert not cache[0][:, kr["e"], :, :2].any()  # the other heads of those blocks were not written
    assert_untouched(cache, set(kr["a"]) | set(kr["b"]) | set(kr["c"]) | set(kr["d"]) | set(kr["e"]))


def plan(prefill_tp: int, decode_tp: int) -> list[tuple[int, int, int, int, int]]:
    """(prefill rank, decode rank, its local head, the receiver's local head, heads) per pair."""
    return [(r, s, lo - kv_head_range(r, prefill_tp, HEADS)[0], lo - kv_head_range(s, decode_tp, HEADS)[0], n)
            for r, s, lo, n in pair_slices(HEADS, prefill_tp, decode_tp)]


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 2), (2, 1)])
def test_tp_resharding(store, peers, tmp_path, prefill_tp, decode_tp):
    resharding(CPU, store, peers, tmp_path, prefill_tp, decode_tp)


def resharding(setup: Setup, store: int, peers, tmp_path: Path, prefill_tp: int, decode_tp: int) -> None:
    """Every decode rank ends up with exactly its heads, each from the prefill rank holding them."""
    rng = random.Random(prefill_tp * 10 + decode_tp)
    pairs = plan(prefill_tp, decode_tp)
    assert len(pairs) == 2
    p_heads = kv_head_range(0, prefill_tp, HEADS)[1] - kv_head_range(0, prefill_tp, HEADS)[0]
    d_heads = kv_head_range(0, decode_tp, HEADS)[1] - kv_head_range(0, decode_tp, HEADS)[0]
    sblocks = {r: two_transfers(rng) for r in range(prefill_tp)}
    dblocks = {s: two_transfers(rng) for s in range(decode_tp)}
    ops_p = {r: [dict(op="open", pair=f"{r}-{s}", index=0) for r2, s, *_ in pairs if r2 == r]
             for r in range(prefill_tp)}
    ops_d = {s: [dict(op="open", pair=f"{r}-{s}", index=1) for r, s2, *_ in pairs if s2 == s]
             for s in range(decode_tp)}
    for t, key in enumerate((11, 12)):  # two transfers queued on every pair
        for r in range(prefill_tp):
            parts = [[f"{r}-{s}", ph, n] for r2, s, ph, _, n in pairs if r2 == r]
            ops_p[r].append(dict(op="send", key=key, blocks=sblocks[r][t], parts=parts))
        for s in range(decode_tp):
            parts = [[f"{r}-{s}", dh, n] for r, s2, _, dh, n in pairs if s2 == s]
            ops_d[s].append(dict(op="recv", key=key, blocks=dblocks[s][t], parts=parts))
    pre = [peers(f"prefill{r}", **cfg(setup, True, store, p_heads, 100 + r,
                                      [*ops_p[r], dict(op="wait", keys=[11, 12])])) for r in range(prefill_tp)]
    dec = [peers(f"decode{s}", **cfg(setup, False, store, d_heads, None,
                                     [*ops_d[s], dict(op="wait", keys=[11, 12]),
                                      dict(op="dump", path=str(tmp_path / f"d{s}.bin"))])) for s in range(decode_tp)]
    for p in pre + dec:
        assert all(e["ok"] for e in p.results([11, 12]).values()), p.name
        p.finish()
    for s in range(decode_tp):
        cache = load_dump(setup, tmp_path / f"d{s}.bin", d_heads)
        for r, s2, ph, dh, n in pairs:
            if s2 == s:
                for t in range(2):
                    assert_heads(cache, dblocks[s][t], dh, contents(setup, 100 + r, p_heads), sblocks[r][t], ph, n)
        assert_untouched(cache, set(dblocks[s][0]) | set(dblocks[s][1]))


def test_dead_or_silent_peer_fails_in_time_and_the_pair_is_rebuilt(store, peers, tmp_path):
    dead_or_silent(CPU, store, peers, tmp_path)


def dead_or_silent(setup: Setup, store: int, peers, tmp_path: Path) -> None:
    timeout, rng = 3.0, random.Random(5)
    sb, rb = shuffled_blocks(rng, 5, set()), shuffled_blocks(rng, 5, set())
    full = [["c", 0, HEADS]]
    dump = tmp_path / "r.bin"
    r = peers("receiver", **cfg(setup, False, store, HEADS, None, timeout=timeout, ops=[
        dict(op="open", pair="c", index=1), dict(op="recv", key=1, blocks=rb, parts=full), dict(op="wait", keys=[1]),
        dict(op="open", pair="c", index=1), dict(op="recv", key=2, blocks=rb, parts=full), dict(op="wait", keys=[2]),
        dict(op="open", pair="c", index=1), dict(op="recv", key=3, blocks=rb, parts=full), dict(op="wait", keys=[3]),
        dict(op="dump", path=str(dump))]))
    s1 = peers("sender1", **cfg(setup, True, store, HEADS, 9, [dict(op="open", pair="c", index=0), dict(op="pause")]))
    r.expect("posted", key=1)
    s1.expect("paused")
    s1.kill()  # dies with a receive posted for it
    # the next sender starts now: the receiver reopens the pair within its timeout of the failure
    s2 = peers("sender2", **cfg(setup, True, store, HEADS, 9, [
        dict(op="open", pair="c", index=0), dict(op="pause"),
        dict(op="open", pair="c", index=0), dict(op="send", key=3, blocks=sb, parts=full), dict(op="wait", keys=[3])]))
    dead = r.expect("result", key=1)
    assert not dead["ok"] and dead["elapsed"] < timeout + 2, dead
    if setup.sees_death:  # seen dead, not waited out
        assert "timed out" not in dead["error"] and dead["elapsed"] < timeout, dead
    s2.expect("paused")  # alive, but sends nothing for key 2
    silent = r.expect("result", key=2)
    # ours or, on CPU, gloo's own timeout of the same length: whichever fires first
    assert not silent["ok"] and "timed out" in silent["error"].lower() and timeout - 0.5 < silent["elapsed"] < timeout + 2
    s2.resume()  # both sides open the pair again: the transfer goes through
    assert s2.expect("result", key=3)["ok"]
    rebuilt = r.expect("result", key=3)
    assert rebuilt["ok"], rebuilt
    r.finish()
    s2.finish()
    cache = load_dump(setup, dump, HEADS)
    assert_heads(cache, rb, 0, contents(setup, 9, HEADS), sb, 0, HEADS)
    assert_untouched(cache, set(rb))


def test_fused_kernels_match_torch_in_triton_interpreter():
    """The GPU data mover's fused kernels, run on CPU by Triton's interpreter against the
    torch path (tests/gpu/test_gpu_kv_kernels.py): their indexing and checksums are
    checked in CI too, not only on GPU hosts (all but the direct-launch test, which needs a GPU)."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not direct_launch",
                          "tests/gpu/test_gpu_kv_kernels.py"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]
