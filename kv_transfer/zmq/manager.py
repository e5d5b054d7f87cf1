"""ZmqKVManager: the KV data plane over ZeroMQ, one per node and role.

Decode role: a ROUTER bound to 127.0.0.1 (tcp; port 0 picks a free one) or to an ipc
path, served by KVInbox's receive thread; expect() registers a transfer into
reserved blocks, cancel() drops it. Prefill role: KVOutbox's I/O thread with one
DEALER per decode endpoint; sender() (sender_for() a ticket) hands out a per-request
ZmqKVSender. Senders from sender_for() stream: the engine's connector worker
(connector.py; rank 0 gathers the other ranks' shards) sends their layers from the
prompt's step; poll() collects the ends the ranks report.
With CURVE keys (a secured cluster, base/curve.py) the ROUTER admits only the listed
prefill peers' keys and each DEALER checks its decode node's key from the ticket.
Explicit start()/close(); close() joins the thread and closes every socket."""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import TypeVar

import zmq

from pdserve.engine.kv_connector import KVSave
from pdserve.kv_transfer.base.conn import KVManager, KVUnavailable, Role, WriteFn
from pdserve.kv_transfer.base.curve import CurveKeys, KeyGate
from pdserve.kv_transfer.base.faults import KVFaults
from pdserve.kv_transfer.base.inbox import KVInbox
from pdserve.kv_transfer.base.layout import KVLayout
from pdserve.kv_transfer.base.outbox import KVOutbox
from pdserve.v1 import node_pb2

from .receiver import ZmqKVReceiver
from .sender import ZmqKVSender

Part = TypeVar("Part", KVInbox, KVOutbox)


class ZmqKVManager(KVManager):
    name = "zmq"

    def __init__(self, role: Role, layout: KVLayout, bind_host: str = "127.0.0.1", port: int = 0,
                 ipc_path: str | None = None, tp: int = 1, poll_interval_s: float = 0.05,
                 layers_per_message: int = 1, ack_timeout_s: float | None = None, fault_hooks: bool = False,
                 curve: CurveKeys | None = None, recv_writers: int = 0):
        """tp: this node's TP size (the number of shards a sender takes per layer, or of
        decode ranks a receiver re-slices for). ipc_path, if given, replaces tcp.
        ack_timeout_s: how long the prefill node waits for a transfer's ack once all of it
        was queued (None: the request's deadline). fault_hooks: test-only faults (faults.py).
        curve: this node's CURVE keys (None: plain ZeroMQ). recv_writers: decode side, the
        threads that check and write messages (KVInbox)."""
        self.curve = curve
        self.gate: KeyGate | None = None
        self.role, self.layout, self.tp, self.ipc_path = Role(role), layout, tp, ipc_path
        self.layers_per_message, self.ack_timeout_s = layers_per_message, ack_timeout_s
        self.recv_writers = recv_writers
        self._faults = KVFaults() if fault_hooks and Role(role) == Role.PREFILL else None
        for rank in range(tp):
            layout.heads(rank, tp)  # raises if tp and the KV heads do not fit
        self.bind_addr = f"ipc://{ipc_path}" if ipc_path else f"tcp://{bind_host}:{port}"
        self.poll_ms = max(1, int(poll_interval_s * 1000))
        self._ctx: zmq.Context | None = None
        self._inbox: KVInbox | None = None
        self._outbox: KVOutbox | None = None
        self._endpoint = ""
        self._saving: set[int] = set()  # keys of saves the engine started and the worker has not reported
        self._streamed: weakref.WeakValueDictionary[int, ZmqKVSender] = weakref.WeakValueDictionary()  # save key ->

    def start(self) -> None:
        if self._ctx is not None:
            raise RuntimeError("ZmqKVManager already started")
        self._ctx = zmq.Context()
        try:
            if self.role == Role.DECODE:
                router = self._ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.LINGER, 0)
                if self.curve is not None:
                    self.gate = KeyGate(self._ctx)
                    self.gate.start()
                    self.curve.serve(router)
                try:
                    router.bind(self.bind_addr)
                except zmq.ZMQError:
                    router.close()
                    raise
                self._endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
                self._inbox = KVInbox(self.layout, router, self.poll_ms, self.recv_writers)
                self._inbox.start()
            else:
                self._outbox = KVOutbox(self._ctx, self.poll_ms, self._faults, self.curve)
                if self._faults is not None:
                    self._faults.install()
                self._outbox.start()
        except BaseException:
            if self.gate is not None:
                self.gate.stop()
            self._ctx.term()
            self._ctx = None
            raise

    def close(self) -> None:
        if self._ctx is None:
            return
        for part in (self._inbox, self._outbox):
            if part is not None:
                part.close()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        self._ctx.term()
        if self._inbox is not None and self.ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ipc_path)  # libzmq leaves the socket file behind
        self._ctx, self._inbox, self._outbox = None, None, None

    @property
    def endpoint(self) -> str:
        """The bound address (decode role), e.g. tcp://127.0.0.1:PORT or ipc:///path."""
        return self._endpoint

    @property
    def pending(self) -> int:
        """Transfers still registered: live expectations (decode) or senders (prefill)."""
        part = self._inbox or self._outbox
        return part.pending if part is not None else 0

    @property
    def connections(self) -> list[str]:
        """Decode endpoints this prefill manager holds a socket to."""
        return self._outbox.endpoints if self._outbox is not None else []

    def expect(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
               write: WriteFn) -> ZmqKVReceiver:
        inbox = self._require(Role.DECODE, self._inbox)
        if not block_ids:
            raise ValueError(f"transfer {transfer_id}: no blocks reserved")
        rx = ZmqKVReceiver(self.layout, transfer_id, epoch, block_ids, lease_expiry, self.tp, write)
        inbox.expect(rx)
        return rx

    def cancel(self, transfer_id: str) -> bool:
        return self._require(Role.DECODE, self._inbox).cancel(transfer_id)

    def sender(self, endpoint: str, transfer_id: str, epoch: int, num_blocks: int,
               stream: bool = False, server_key: bytes | None = None) -> ZmqKVSender:
        """stream: the engine's step sends the layers; otherwise the caller does.
        server_key: the decode node's CURVE public key (required with CURVE)."""
        outbox = self._require(Role.PREFILL, self._outbox)
        if self.curve is not None:
            if not server_key:
                raise KVUnavailable(f"no CURVE key for {endpoint}: this node sends KV only over CURVE (give every "
                                    f"member the same credentials)")
            outbox.set_server_key(endpoint, server_key)
        tx = ZmqKVSender(self.layout, self.tp, endpoint, transfer_id, epoch, num_blocks, outbox.submit,
                         self.layers_per_message, stream=stream)
        try:
            outbox.add(tx)
        except BaseException:
            tx.fail("not added")
            raise
        if tx.save is not None:
            self._streamed[tx.save.key] = tx
        return tx

    async def sender_for(self, ticket: node_pb2.Ticket, num_blocks: int) -> ZmqKVSender:
        return self.sender(ticket.kv_endpoint, ticket.transfer_id, ticket.epoch, num_blocks, stream=True,
                           server_key=ticket.kv_curve_key.encode())

    def on_peers(self, node_id: str, peers: list[node_pb2.Peer]) -> None:
        """Decode role with CURVE: admit exactly the listed prefill peers' keys."""
        if self.gate is not None:
            self.gate.allow({p.kv_curve_key.encode() for p in peers if p.kv_curve_key})

    # engine thread

    def on_save_start(self, save: KVSave) -> None:
        self._saving.add(save.key)

    def poll(self, engine) -> bool:
        """Forget the saves the ranks report ended (rank 0's worker failed their senders itself;
        a failure on another rank fails the sender here)."""
        if self._saving:
            ended = engine.kv_finished(list(self._saving))
            for key, (ok, error) in ended.items():
                tx = self._streamed.get(key)
                if not ok and tx is not None:
                    tx.fail(error)
            self._saving.difference_update(ended)
        return bool(self._saving)

    def _require(self, role: Role, part: Part | None) -> Part:
        if self.role != role:
            raise RuntimeError(f"a {self.role.value} KV manager has no {role.value}-side calls")
        if part is None:
            raise RuntimeError("KV manager not started")
        return part
