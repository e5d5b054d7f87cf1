"""KV data plane: moves a prompt's KV from prefill ranks to decode ranks.

    base.py           roles: TransferState, KVSender (prefill, per request), KVReceiver
                      (decode, per request), KVManager (per node)
    layout.py         KVLayout, kv_head_range (which heads a TP rank holds), head re-slicing
    header.py         the [KVHeader, *frames] message: build and check (version, hash, sizes, XXH3 checksums)
    zmq_transport.py  ZmqKVManager: the ZeroMQ transport's manager, either role
    zmq_inbox.py      decode side: the ROUTER socket and its receive thread
    zmq_outbox.py     prefill side: DEALER sockets per endpoint and their I/O thread
    zmq_sender.py     ZmqKVSender           zmq_receiver.py  ZmqKVReceiver
    nccl_transport.py NcclKVManager: the NCCL transport's manager (pair sets, control over ZeroMQ)
    nccl_pairs.py     which heads move over which (prefill rank, decode rank) pair; PairSet
    nccl_sender.py    NcclKVSender          nccl_receiver.py NcclKVReceiver
    nccl_rank.py      RankKV: each rank's data mover (NCCL on GPU, gloo on CPU)
    nccl_store.py     the pair rendezvous store, on a socket we bind
The NCCL modules are imported only by nodes started with --kv-transport nccl.
"""
from .base import KVManager, KVReceiver, KVSender, Role, TransferState, WriteFn
from .layout import KVLayout, kv_head_range
from .zmq_transport import ZmqKVManager

__all__ = ["KVLayout", "KVManager", "KVReceiver", "KVSender", "Role", "TransferState", "WriteFn", "ZmqKVManager",
           "kv_head_range"]
