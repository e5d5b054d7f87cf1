"""Which KV heads move over which pair of the NCCL transport: one 2-rank communicator
per (prefill rank, decode rank) that share heads, each decode rank getting each of
its heads from exactly one prefill rank (replicated heads are sent once per decode
rank that holds them); a PairSet is every pair between one prefill node and one
decode node, named so that a rebuilt set never meets the old one's keys."""
from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from pdserve.engine.kv_connector import KVChannel, KVRoute
from pdserve.kv_transfer.base.conn import Role
from pdserve.kv_transfer.base.layout import kv_head_range, unique_ranks


def transfer_key(transfer_id: str) -> int:
    """The int64 a transfer is known by on the ranks."""
    return xxhash.xxh3_64_intdigest(transfer_id.encode()) & ((1 << 62) - 1)


def pair_slices(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[tuple[int, int, int, int]]:
    """(prefill rank, decode rank, first global head, heads) for every pair that moves
    heads: each decode rank gets each of its heads from exactly one prefill rank."""
    out = []
    for s in range(decode_tp):
        c, d = kv_head_range(s, decode_tp, num_kv_heads)
        for r in unique_ranks(prefill_tp, num_kv_heads):
            a, b = kv_head_range(r, prefill_tp, num_kv_heads)
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((r, s, lo, hi - lo))
    return sorted(out)


@dataclass
class PairSet:
    """The pairs between one prefill node and one decode node."""
    name: str
    num_kv_heads: int
    prefill_tp: int
    decode_tp: int
    peer_id: str = ""            # the other node's id
    peer_epoch: int = 0
    endpoint: str = ""           # decode node's control endpoint (prefill side)
    ready: bool = False
    broken: bool = False
    slices: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slices = pair_slices(self.num_kv_heads, self.prefill_tp, self.decode_tp)

    def pair(self, r: int, s: int) -> str:
        return f"{self.name}/{r}-{s}"

    @property
    def pairs(self) -> list[str]:
        return [self.pair(r, s) for r, s, _, _ in self.slices]

    def dests(self) -> tuple[KVRoute, ...]:
        """What each prefill rank sends: (rank, pair, first local head, heads)."""
        return self._routes(Role.PREFILL)

    def srcs(self) -> tuple[KVRoute, ...]:
        """What each decode rank receives: (rank, pair, first local head, heads)."""
        return self._routes(Role.DECODE)

    def _routes(self, role: Role) -> tuple[KVRoute, ...]:
        out = []
        for r, s, lo, n in self.slices:
            rank, tp = (r, self.prefill_tp) if role == Role.PREFILL else (s, self.decode_tp)
            out.append(KVRoute(rank, self.pair(r, s), lo - kv_head_range(rank, tp, self.num_kv_heads)[0], n))
        return tuple(out)

    def channels(self, role: Role, host: str, port: int) -> tuple[KVChannel, ...]:
        """The pairs one side's ranks join, in (prefill rank, decode rank) order on both sides."""
        prefill = role == Role.PREFILL
        return tuple(KVChannel(self.pair(r, s), r if prefill else s, 0 if prefill else 1, host, port)
                     for r, s, _, _ in self.slices)
