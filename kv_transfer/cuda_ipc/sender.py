"""Prefill side of the cuda-ipc transport, one per request. Lifecycle: created ->
announce sent at once (the claim on the reservation) -> granted by the decode node
(epoch and lease checked there; only now may the engine write its blocks, so the
request enters the engine only after this) -> the step copies the prompt's KV layer by
layer (on_data: copies ran, checksums compared) and the prompt's first token is known
(complete) -> finish queued with the first token; DONE once the I/O thread took it.
A failed copy or a withdrawal after the grant sends a withdrawal, which frees the
decode node's blocks; one during the copies waits for them to end."""
from __future__ import annotations

import threading
from collections.abc import Callable

from pdserve.engine.kv_connector import KVSave
from pdserve.kv_transfer.base.conn import ExportFn, KVSender, Outgoing
from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range, unique_ranks
from pdserve.kv_transfer.base.status import TransferState, TransferStatus
from pdserve.kv_transfer.nccl.pairs import PairSet, transfer_key
from pdserve.v1 import kv_pb2


class IpcKVSender(KVSender):
    def __init__(self, layout: KVLayout, pairs: PairSet, transfer_id: str, epoch: int, remote_block_ids: list[int],
                 submit: Callable[[KVSender, Outgoing], None]):
        super().__init__(transfer_id, epoch, len(remote_block_ids), pairs.endpoint)
        self.layout, self.pairs, self._submit = layout, pairs, submit
        self.key = transfer_key(transfer_id)
        self.save = KVSave(self.key, pairs.dests(), remote_block_ids=tuple(remote_block_ids))
        self.grant = TransferStatus()     # DONE: the decode node let us write; FAILED: refused
        self._lock = threading.Lock()
        self._saving = False              # the engine issued the copies
        self._data: bool | None = None    # copies ended: ok or not
        self._first_token: int | None = None
        self._failure = ""                # why the withdrawal goes out
        self._closing = False             # the finish or the withdrawal is queued
        self._refused = False             # the decode node refused the announce: it holds nothing for us

    def claim(self) -> None:
        self.status.start()
        self._submit(self, Outgoing(0, self.layout.num_layers))

    def saving(self) -> None:
        """Engine thread: the coming step queues the copies."""
        with self._lock:
            self._saving = True

    def complete(self, first_token: int, export: ExportFn) -> None:
        with self._lock:
            self._first_token = first_token
        self._advance()

    def on_data(self, ok: bool, error: str) -> None:
        with self._lock:
            self._data = ok
            if not ok:
                self._failure = self._failure or f"KV copy failed: {error}"
        self._advance()

    def withdraw(self, why: str = "withdrawn") -> None:
        with self._lock:
            self._failure = self._failure or why
        self._advance()

    def _advance(self) -> None:
        """Queue the finish or the withdrawal once it is due (never while copies may still write)."""
        with self._lock:
            if self._closing or self.status.ended:
                return
            if self._saving and self._data is None:
                return
            if self._failure:
                out = Outgoing(0, 0, last=True, first_token=-1)
            elif self._data and self._first_token is not None:
                out = Outgoing(self.layout.num_layers, 0, last=True, first_token=self._first_token)
            else:
                return
            self._closing = True
        if self.status.state == TransferState.WAITING:  # never claimed: nothing to tell
            self.fail(self._failure)
        else:  # a withdrawal ends the receiver even where its grant is still on the way
            self._submit(self, out)

    def build_message(self, out: Outgoing) -> list[bytes]:
        withdrawn = out.last and out.first_token < 0
        if withdrawn:
            self.status.fail(self._failure or "withdrawn")
        elif out.last:
            self.status.finish()
        layout, tp = self.layout, self.pairs.prefill_tp
        shards = [kv_pb2.KVShard(tp_rank=r, head_start=kv_head_range(r, tp, layout.num_kv_heads)[0],
                                 num_heads=kv_head_range(r, tp, layout.num_kv_heads)[1]
                                 - kv_head_range(r, tp, layout.num_kv_heads)[0])
                  for r in unique_ranks(tp, layout.num_kv_heads)] if out.num_layers and not out.last else []
        return [kv_pb2.KVHeader(
            protocol_version=PROTOCOL_VERSION, compat_hash=layout.compat_hash, transfer_id=self.transfer_id,
            epoch=self.epoch, layer_start=out.layer_start, num_layers=out.num_layers if not out.last else 0,
            total_layers=layout.num_layers, num_blocks=self.num_blocks, block_size=layout.block_size,
            head_dim=layout.head_dim, dtype=layout.dtype_name, shards=shards, last=out.last,
            first_token=max(out.first_token, 0), pair_set=self.pairs.name, withdrawn=withdrawn).SerializeToString()]

    def fail(self, error: str) -> None:
        """Ended from outside (a send error, a bug, shutdown): once announced and not refused,
        through a withdrawal, so the decode node frees the blocks it holds for us."""
        if self._refused or self.status.state == TransferState.WAITING or self._closing:
            super().fail(error)
        else:
            self.withdraw(error)

    def on_ack(self, ack: kv_pb2.KVAck) -> None:
        self.answered = True
        if ack.granted:
            self.grant.finish()
        elif not ack.ok:
            self._refused = True
            self.grant.fail(ack.error)
            self.fail(f"refused by the receiver: {ack.error}")
