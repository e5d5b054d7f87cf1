"""Opening and closing the pairs of the NCCL KV transport: both sides meet in the
rendezvous store under fresh keys, build a 2-rank NCCL communicator (GPU) or gloo
group (CPU) and exchange one warm-up message; a closed pair is aborted quietly."""
from __future__ import annotations

import datetime
import logging
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore

from . import lib as nccl_lib
from .rank_cpu import Waiter
from .state import Pair
from .store import connect_store

log = logging.getLogger(__name__)

_WARMUP = 0x6B76  # the warm-up message's value, checked by the receiver


@dataclass(frozen=True)
class PairOptions:
    device: torch.device
    timeout_s: float                  # opening (the peer must come) and gloo's work timeout
    bind_host: str = "127.0.0.1"      # gloo's listening address
    max_ctas: int = 0                 # NCCL: at most this many CTAs (SMs) per pair communicator; 0 = NCCL's choice
    min_ctas: int = 0                 # NCCL: at least this many; 0 = NCCL's choice


def open_pair(opts: PairOptions, name: str, host: str, port: int, index: int) -> Pair:
    """Blocking: build the pair's 2-rank communicator through the store at (host, port),
    index 0 on the prefill (sending) side, 1 on the decode side, and exchange one tiny
    message so its connection exists before the first transfer. Raises on failure, or
    when the peer does not come within timeout_s."""
    if index not in (0, 1):
        raise ValueError(f"pair index must be 0 (sender) or 1 (receiver), got {index}")
    deadline = time.monotonic() + opts.timeout_s
    base = PrefixStore(f"pdserve-kv/{name}/", connect_store(host, port, opts.timeout_s))
    store = PrefixStore(f"{_meet(base, index, deadline, name)}/", base)  # fresh keys for every opening
    if opts.device.type == "cuda":
        p = Pair(name, index, None, torch.cuda.Stream(opts.device, priority=-1), None,
                 comm=_new_comm(opts, store, index, deadline, name), wire=torch.cuda.Stream(opts.device, priority=-1))
    else:
        p = Pair(name, index, _new_group(opts, store, index), None, Waiter(name))
    try:
        _warm_up(opts, p, deadline)
    except BaseException:
        abort(p)
        if p.waiter is not None:
            p.waiter.stop()
        raise
    return p


def _new_comm(opts: PairOptions, store, index: int, deadline: float, pair: str) -> nccl_lib.Comm:
    """The pair's NCCL communicator: the sender draws its unique id, the receiver reads it
    from the store (128 bytes, under this opening's fresh prefix)."""
    if index == 0:
        store.set("nccl-id", nccl_lib.unique_id())
    while not store.check(["nccl-id"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pair {pair}: the sender's NCCL id did not come")
        time.sleep(0.002)
    uid = store.get("nccl-id")
    min_ctas, max_ctas = 0, 0
    if opts.max_ctas > 0:
        # a receive spins on its SMs until the data comes (for a streamed prefill, the
        # whole forward): fewer CTAs leave more SMs to the compute beside it
        min_ctas, max_ctas = 1, opts.max_ctas
    if opts.min_ctas > 0:  # NCCL wants both bounds set
        min_ctas, max_ctas = opts.min_ctas, max(opts.min_ctas, opts.max_ctas if opts.max_ctas > 0 else 64)
    with torch.cuda.device(opts.device):
        return nccl_lib.Comm(uid, 2, index, min_ctas, max_ctas)



def _new_group(opts: PairOptions, store, index: int):
    gloo = dist.ProcessGroupGloo._Options()
    gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=opts.bind_host)]
    gloo._timeout = datetime.timedelta(seconds=opts.timeout_s)
    gloo._threads = 2
    return dist.ProcessGroupGloo(store, index, 2, gloo)


def _warm_up(opts: PairOptions, pair: Pair, deadline: float) -> None:
    """One int64 from sender to receiver: NCCL connects the pair now, not at its first transfer."""
    if pair.index == 0:
        t = torch.tensor([_WARMUP], dtype=torch.int64, device=opts.device)
    else:
        t = torch.zeros(1, dtype=torch.int64, device=opts.device)
    if opts.device.type == "cuda":
        pair.wire.wait_stream(torch.cuda.current_stream(opts.device))
        if pair.index == 0:
            pair.comm.send(t.data_ptr(), 8, 1, pair.wire.cuda_stream)
        else:
            pair.comm.recv(t.data_ptr(), 8, 0, pair.wire.cuda_stream)
        done = torch.cuda.Event()
        done.record(pair.wire)
        while not done.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"pair {pair.name}: the warm-up message did not complete in {opts.timeout_s:g} s")
            time.sleep(0.001)
        if (code := pair.comm.async_error()) != nccl_lib.SUCCESS:
            raise nccl_lib.NcclError(f"pair {pair.name}: the warm-up message", code)
    else:
        work = pair.group.send([t], 1, 0) if pair.index == 0 else pair.group.recv([t], 0, 0)
        work.wait(datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
    if pair.index == 1 and int(t.item()) != _WARMUP:
        raise RuntimeError(f"pair {pair.name}: the warm-up message held {int(t.item())}, expected {_WARMUP}")


def comm_error(pair: Pair) -> str:
    """The pair's asynchronous NCCL error, "" if none (GPU)."""
    try:
        code = pair.comm.async_error() if pair.comm is not None else nccl_lib.SUCCESS
    except nccl_lib.NcclError as e:
        return f"pair {pair.name}: {e}"
    if code in (nccl_lib.SUCCESS, nccl_lib.IN_PROGRESS):
        return ""
    return f"pair {pair.name}: {nccl_lib.NcclError('asynchronous error', code)}"


def _meet(store, index: int, deadline: float, pair: str) -> str:
    """Both sides of a pair agree on a fresh key prefix for this opening: each publishes a
    nonce and acknowledges the other's; done when the peer acknowledged our current one.
    Keys left by an earlier opening (a dead peer's) never match, so they cannot be joined."""
    mine, me, peer = uuid.uuid4().hex[:16], str(index), str(1 - index)
    store.set(f"hello/{me}", mine)
    acked = None
    while True:
        if store.check([f"hello/{peer}"]):
            other = store.get(f"hello/{peer}").decode()
            if other != acked:
                store.set(f"ack/{me}", f"{mine}:{other}")
                acked = other
            if store.check([f"ack/{peer}"]) and store.get(f"ack/{peer}").decode() == f"{other}:{mine}":
                return f"{mine}.{other}" if index == 0 else f"{other}.{mine}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"pair {pair}: the peer (index {1 - index}) did not come")
        time.sleep(0.005)


def abort(pair: Pair) -> None:
    """Abort a pair's communicator or group, quietly: NCCL stops its kernels; gloo closes what it can."""
    try:
        if pair.comm is not None:
            pair.comm.abort()
        elif pair.group is not None:
            pair.group.abort()
    except Exception:  # noqa: BLE001 - closing must not fail
        log.warning("aborting KV pair %s failed", pair.name, exc_info=True)
