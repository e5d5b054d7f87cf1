"""IpcKVManager: the cuda-ipc KV data plane, one per node and role. It is the NCCL
manager's pairing and control channel (pair sets opened when the coordinator lists a
decode node, OpenKVPairs checking version and compat hash, the pairing store, control
messages over ZeroMQ) with its own rules:

- pairing: the prefill node sends its host id; the decode node refuses another host
  with a precise message (and the prefill ranks check the host id of every export),
  then publishes each pair's head offset in the store, where its ranks publish their
  pools' exports. A decode restart comes with a new epoch: the prefill node opens a new
  pair set (new names, new handles) and drops the old one.
- a sender is handed out only once the decode node granted the write (its announce
  checked epoch and lease there): the request never reaches the engine otherwise, so
  a stale epoch or an expired lease never writes. A ticket older than the pair set's
  decode epoch is refused at once.
- the decode side has no receives to post: a receiver ends at the finish (DONE, with
  the first token) or withdrawal; a prefill node that leaves ends its granted ones."""
from __future__ import annotations

import asyncio
import logging
import time

from pdserve.kv_transfer.base.conn import KVUnavailable, NodeLink, Role, WriteFn
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range
from pdserve.kv_transfer.nccl.manager import NcclKVManager
from pdserve.kv_transfer.nccl.pairs import PairSet
from pdserve.v1 import node_pb2

from .config import IpcConfig
from .connector import store_key
from .export import host_id
from .receiver import IpcInbox, IpcKVReceiver
from .sender import IpcKVSender

log = logging.getLogger(__name__)


class IpcKVManager(NcclKVManager):
    name = "cuda-ipc"
    inbox_class = IpcInbox

    def __init__(self, role: Role, layout: KVLayout, link: NodeLink, config: IpcConfig, tp: int = 1,
                 poll_interval_s: float = 0.05):
        super().__init__(role, layout, link, bind_host=config.host, tp=tp, poll_interval_s=poll_interval_s)
        self.config = config
        self.host_id = host_id()

    def close(self) -> None:
        if self._inbox is not None:  # the pool goes with this process: nothing waits on a grant any more
            for rx in self._inbox.receivers():
                rx.peer_gone("KV manager closed")
        super().close()

    # pairing

    def pairs_request(self, name: str) -> node_pb2.KVPairsRequest:
        req = super().pairs_request(name)
        req.host_id = self.host_id
        return req

    def check_pairs_request(self, req: node_pb2.KVPairsRequest) -> None:
        super().check_pairs_request(req)
        if req.host_id != self.host_id:
            raise ValueError(f"cuda-ipc needs both nodes on one host: the prefill node {req.prefill_node_id} is on "
                             f"host {req.host_id or '(not sent)'}, this decode node on {self.host_id}; use "
                             f"--kv-transport zmq or nccl between hosts")

    def accept_pairs(self, req: node_pb2.KVPairsRequest) -> tuple[str, int]:
        self.check_pairs_request(req)
        ps = PairSet(req.pair_set, self.layout.num_kv_heads, req.prefill_tp, self.tp)
        for r, s, lo, _ in ps.slices:  # before the answer: the prefill ranks read it next
            offset = lo - kv_head_range(s, self.tp, self.layout.num_kv_heads)[0]
            self._store.set(store_key(ps.pair(r, s), "dst_head"), str(offset))
        return super().accept_pairs(req)

    def _drop(self, ps: PairSet) -> None:
        super()._drop(ps)
        if self._inbox is not None:
            for rx in self._inbox.receivers():
                if rx.pair_set == ps.name:
                    rx.peer_gone(f"the prefill node of pair set {ps.name} left")

    # decode role

    def expect(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
               write: WriteFn | None = None) -> IpcKVReceiver:
        if self._inbox is None:
            raise RuntimeError("a prefill KV manager has no decode-side calls")
        if not block_ids:
            raise ValueError(f"transfer {transfer_id}: no blocks reserved")
        rx = IpcKVReceiver(self.layout, transfer_id, epoch, block_ids, lease_expiry, self.tp,
                           lambda name: name in self.pair_sets, self.retire)
        self._inbox.expect(rx)
        return rx

    # prefill role

    def on_save_start(self, save) -> None:
        tx = self._senders.get(save.key)
        if tx is None or tx.status.ended:
            log.warning("KV copies issued for an unknown or ended transfer")
            return
        tx.saving()
        self._pending[tx.key] = tx

    async def sender_for(self, ticket: node_pb2.Ticket, num_blocks: int) -> IpcKVSender:
        """A sender into the ticket's blocks, once the decode node granted the write."""
        if len(ticket.block_ids) != num_blocks:
            raise KVUnavailable(f"the ticket reserves {len(ticket.block_ids)} blocks, the prompt needs {num_blocks}")
        pairs = await self._pairs_for(ticket, wait_s=self.config.timeout_s)
        if self._outbox is None:
            raise RuntimeError("cuda-ipc senders need a prefill manager")
        self.trust(pairs.endpoint, ticket)
        tx = IpcKVSender(self.layout, pairs, ticket.transfer_id, ticket.epoch, list(ticket.block_ids),
                         self._outbox.submit)
        self._senders = {k: s for k, s in self._senders.items() if not s.status.ended}
        self._senders[tx.key] = tx
        self._outbox.add(tx)
        tx.claim()
        left = max(0.1, min(self.config.timeout_s, ticket.lease_expiry - time.time()))
        try:
            granted = await tx.grant.ended_async(left) and not tx.grant.error
        except BaseException:  # the call was cancelled: a grant on its way must not pin the blocks
            tx.withdraw("cancelled before the write was granted")
            raise
        if not granted:
            reason = tx.grant.error or f"no grant within {left:.1f} s"
            tx.withdraw(reason)
            raise KVUnavailable(f"the decode node did not grant the KV write: {reason}")
        return tx

    async def _pairs_for(self, ticket: node_pb2.Ticket, wait_s: float) -> PairSet:
        """The open pair set towards the ticket's decode node under the ticket's epoch,
        waiting for one being (re)opened."""
        deadline = time.monotonic() + wait_s
        while True:
            ps = self._by_peer.get(ticket.decode_node_id)
            if ps is not None and ps.ready and not ps.broken:
                if ps.peer_epoch == ticket.epoch:
                    return ps
                if ticket.epoch < ps.peer_epoch:
                    raise KVUnavailable(f"stale epoch {ticket.epoch}: decode node {ticket.decode_node_id} is at "
                                        f"epoch {ps.peer_epoch}")
            if time.monotonic() >= deadline:
                raise KVUnavailable(f"no cuda-ipc pairs open towards decode node {ticket.decode_node_id} "
                                    f"at epoch {ticket.epoch}")
            await asyncio.sleep(0.005)
