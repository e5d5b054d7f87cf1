"""The node-side contract every KV transport implements (SGLang disaggregation style):
a KVManager per node and role, a KVSender per request on prefill, a KVReceiver per
request on decode. The nodes use only what is written here, whatever the transport.

Prefill side: manager.sender_for(ticket, num_blocks) -> sender. The request goes to the
engine with sender.save (None where the transport does not save from the engine step);
when its prompt step ends, the engine thread calls sender.complete(first_token, export)
(export reads back the prompt KV the step did not send, for transports or TP sizes
that send after the step), or
sender.withdraw(why) if the request ended otherwise. The sender ends DONE once the
decode side took it all, FAILED (with error) otherwise.

Decode side: manager.expect(transfer_id, epoch, block_ids, lease_expiry, write) for
blocks reserved under a lease and epoch; the receiver calls write(layer, per_rank) for
each verified layer, re-sliced to the decode ranks' heads, and ends DONE (first_token
set) or FAILED (bad data, stale epoch, lease expired, cancelled): the owner then frees
or admits the blocks. cancel(transfer_id) drops an expectation.

Optional hooks (no-ops by default, so the nodes never branch on the transport):
on_peers (the coordinator's peer lists), accept_pairs (a peer's pairing request),
poll (the engine loop's poll between steps), on_save_start (the engine starts a save)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import torch

from pdserve.engine.kv_connector import KVSave
from pdserve.v1 import kv_pb2, node_pb2

from .curve import CurveKeys
from .status import TransferState, TransferStatus


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class KVUnavailable(Exception):
    """No path to the decode node for this transfer now (the request may be retried elsewhere)."""


# write(layer, per_rank): per_rank[r] is decode rank r's [2, nblocks, block_size, n_r, head_dim] KV
WriteFn = Callable[[int, list[torch.Tensor]], None]
# export(layer_start, num_layers): [layer][prefill rank] KV shards of the prompt's blocks
ExportFn = Callable[[int, int], list[list[torch.Tensor]]]


@dataclass
class Outgoing:
    """One control-channel message queued by a sender: layers [layer_start, layer_start +
    num_layers), their shards layer-major (replicated ranks left out; none for a transport
    that moves the data elsewhere)."""
    layer_start: int
    num_layers: int
    shards: list[torch.Tensor] = field(default_factory=list)
    last: bool = False
    first_token: int = 0


class _Transfer:
    """A sender's or receiver's view of its TransferStatus."""
    status: TransferStatus

    @property
    def state(self) -> TransferState:
        return self.status.state

    @property
    def error(self) -> str:
        return self.status.error


class KVSender(_Transfer, ABC):
    """Prefill side, one per request."""
    save: KVSave | None = None   # what the engine step saves for this request, if the transport saves there
    bytes_sent: int | None = None  # KV payload bytes put on the wire, where the transport counts them

    def __init__(self, transfer_id: str, epoch: int, num_blocks: int, endpoint: str = ""):
        self.transfer_id, self.epoch, self.num_blocks, self.endpoint = transfer_id, epoch, num_blocks, endpoint
        self.status = TransferStatus()
        self.answered = False  # the receiver acked (ok or not): its endpoint is alive

    @abstractmethod
    def complete(self, first_token: int, export: ExportFn) -> None:
        """Engine thread, as the prompt's step ends: send what is left and the first token."""

    def withdraw(self, why: str) -> None:
        """The request ends without this transfer: fail it (a transport tells its receiver if it must)."""
        self.fail(why)

    # the control channel (base/outbox.py)

    @abstractmethod
    def build_message(self, out: Outgoing) -> list:
        """(I/O thread) [header, *frames] of a queued message."""

    def on_ack(self, ack: kv_pb2.KVAck) -> None:
        self.answered = True
        if ack.ok:
            self.status.finish()
        else:
            self.status.fail(f"refused by the receiver: {ack.error}")
        self.release()

    def fail(self, error: str) -> None:
        self.status.fail(error)
        self.release()

    def release(self) -> None:
        """Drop what is held for the transfer once it ended."""

    @property
    def peer_suspect(self) -> bool:
        """Failed without an answer after sending something: the peer may be gone."""
        return self.state == TransferState.FAILED and not self.answered

    def wait(self, timeout: float | None) -> TransferState:
        """Block until the receiver acked (DONE), refused (FAILED), or timeout (FAILED)."""
        if self.status.wait(timeout) != TransferState.DONE:
            self.status.fail(f"no ack from the receiver within {timeout} s")
        self.release()
        return self.status.state


class KVReceiver(_Transfer, ABC):
    """Decode side, one per request: created by KVManager.expect."""

    def __init__(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float, tp: int):
        self.transfer_id, self.epoch, self.block_ids = transfer_id, epoch, list(block_ids)
        self.lease_expiry, self.tp = lease_expiry, tp
        self.first_token: int | None = None
        self.status = TransferStatus()

    @abstractmethod
    def accept(self, header: kv_pb2.KVHeader, frames) -> str:
        """(control channel) Check and take one message of this transfer; the failure reason, "" if accepted."""

    def fail(self, error: str) -> bool:
        """FAILED unless already ended; True if this call ended it (or will, once nothing writes the blocks)."""
        return self.status.fail(error)

    def cancel(self) -> bool:
        """The request is gone: end as soon as nothing can write the blocks any more."""
        return self.fail("cancelled")

    def wait(self, timeout: float | None) -> TransferState:
        """Block until DONE or FAILED; the state as it is when the timeout passes otherwise."""
        return self.status.wait(timeout)


class KVManager(ABC):
    """One per node and role; owns the transport's sockets and threads."""
    name = ""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Address senders reach this node at (decode role)."""

    @abstractmethod
    async def sender_for(self, ticket: node_pb2.Ticket, num_blocks: int) -> KVSender:
        """Prefill role: a sender into a decode node's reservation; KVUnavailable if there is no path now."""

    @abstractmethod
    def expect(self, transfer_id: str, epoch: int, block_ids: list[int], lease_expiry: float,
               write: WriteFn) -> KVReceiver:
        """Decode role: register a transfer into reserved blocks, valid until lease_expiry (time.time())."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Decode role: drop an expectation; its receiver ends once nothing writes its blocks."""

    # optional hooks

    def on_peers(self, node_id: str, peers: list[node_pb2.Peer]) -> None:
        """(event loop) This node's id and the live peers the coordinator listed."""

    def accept_pairs(self, req: node_pb2.KVPairsRequest) -> tuple[str, int]:
        """Decode role, OpenKVPairs: (rendezvous host, port); ValueError where this transport has none."""
        raise ValueError(f"this decode node's KV transport is {self.name}, not {req.kv_transport or 'nccl'}: it "
                         f"opens no pairs; give both nodes the same --kv-transport")

    def poll(self, engine) -> bool:
        """(engine thread, between steps) Collect ended transfers; True while any is in flight."""
        return False

    def on_save_start(self, save: KVSave) -> None:
        """(engine thread) The coming step starts this save."""


EngineCall = Callable[[Callable], Future]   # runs fn(engine) on the engine thread


@dataclass(frozen=True)
class NodeLink:
    """What a manager may use of its node: the engine thread, and the pairing RPC on a peer."""
    engine_call: EngineCall
    open_pairs: Callable[[node_pb2.Peer, node_pb2.KVPairsRequest], Awaitable[node_pb2.KVPairsResponse]] | None = None
    curve: CurveKeys | None = None   # this node's CURVE keys: the ZeroMQ sockets encrypt and authenticate
