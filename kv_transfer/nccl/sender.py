"""Prefill side of the NCCL transport, one per request. The engine moves the data
(LLMEngine.add_request(kv_save=sender.save): the step that completes the prompt
sends it); the sender sends the two control messages through `submit` (the
control channel's outbox). Lifecycle: created (WAITING) -> announce, queued by the engine thread right
before the sending step (TRANSFERRING) -> every rank's sends completed and the
finish (first token) taken by the I/O thread (DONE) | a send failed, the receiver
refused, or the request was withdrawn before its sends were issued (FAILED)."""
from __future__ import annotations

from collections.abc import Callable

from pdserve.engine.kv_connector import KVSave
from pdserve.kv_transfer.base.conn import ExportFn, KVSender, Outgoing
from pdserve.kv_transfer.base.header import PROTOCOL_VERSION
from pdserve.kv_transfer.base.layout import KVLayout, kv_head_range, unique_ranks
from pdserve.v1 import kv_pb2

from .pairs import PairSet, transfer_key


class NcclKVSender(KVSender):
    """Prefill side, one per request: the engine sends the data; this sends the two
    control messages and ends DONE once the ranks' sends completed and the finish was queued."""

    def __init__(self, layout: KVLayout, pairs: PairSet, transfer_id: str, epoch: int, num_blocks: int,
                 submit: Callable[[KVSender, Outgoing], None]):
        super().__init__(transfer_id, epoch, num_blocks, pairs.endpoint)
        self.layout, self.pairs, self._submit = layout, pairs, submit
        self.key = transfer_key(transfer_id)
        self.save = KVSave(self.key, pairs.dests())   # LLMEngine.add_request(kv_save=...)
        self._data_ok = self._finish_queued = self._finished = self._withdrawing = False

    def announce(self) -> None:
        """Engine thread, in send order: tell the decode node to post its receives."""
        self.status.start()
        self._submit(self, Outgoing(0, self.layout.num_layers))

    def complete(self, first_token: int, export: ExportFn) -> None:
        """The step sent the data: queue the finish (the first token) now, from the engine thread."""
        self.finish(first_token)

    def finish(self, first_token: int) -> None:
        """Queue the finish (the first token); thread-safe: the prefill node calls it from
        the engine thread as the prompt's step ends."""
        if self._finish_queued:
            raise RuntimeError(f"transfer {self.transfer_id}: finish called twice")
        self._finish_queued = True
        if not self.status.ended:  # DONE only once the I/O thread took the message (build_message)
            self._submit(self, Outgoing(self.layout.num_layers, 0, last=True, first_token=first_token))

    def withdraw(self, why: str = "withdrawn") -> None:
        """The request ended before its sends were issued (or is given up): tell the receiver not to wait."""
        if not self.status.ended and not self._withdrawing:
            self._withdrawing = True
            self._submit(self, Outgoing(0, 0, last=True, first_token=-1))

    def on_data(self, ok: bool, error: str) -> None:
        if not ok:
            self.fail(f"NCCL send failed: {error}")
        else:
            self._data_ok = True
            self._maybe_done()

    def _maybe_done(self) -> None:
        if self._data_ok and self._finished:
            self.status.finish()

    def build_message(self, out: Outgoing) -> list[bytes]:
        """(I/O thread) The control message; the finish, once built, may end the transfer."""
        withdrawn = out.last and self._withdrawing
        if withdrawn:
            self.status.fail("withdrawn")
        elif out.last:
            self._finished = True
            self._maybe_done()
        layout = self.layout
        shards = [kv_pb2.KVShard(tp_rank=r, head_start=kv_head_range(r, self.pairs.prefill_tp, layout.num_kv_heads)[0],
                                 num_heads=n) for r, n in self._shard_heads()] if out.num_layers else []
        return [kv_pb2.KVHeader(
            protocol_version=PROTOCOL_VERSION, compat_hash=layout.compat_hash, transfer_id=self.transfer_id,
            epoch=self.epoch, layer_start=out.layer_start, num_layers=out.num_layers, total_layers=layout.num_layers,
            num_blocks=self.num_blocks, block_size=layout.block_size, head_dim=layout.head_dim,
            dtype=layout.dtype_name, shards=shards, last=out.last, first_token=out.first_token,
            pair_set=self.pairs.name, withdrawn=withdrawn).SerializeToString()]

    def _shard_heads(self) -> list[tuple[int, int]]:
        h, tp = self.layout.num_kv_heads, self.pairs.prefill_tp
        return [(r, kv_head_range(r, tp, h)[1] - kv_head_range(r, tp, h)[0]) for r in unique_ranks(tp, h)]

    def on_ack(self, ack: kv_pb2.KVAck) -> None:
        self.answered = True
        if not ack.ok:
            self.fail(f"refused by the receiver: {ack.error}")

    # release(): nothing held here, the ranks hold the buffers until their sends end
