"""The ZeroMQ backend: data and control over ZeroMQ frames, streamed layer by layer from
the prompt's step at any TP size (connector.py)."""
from __future__ import annotations

from pdserve.kv_transfer.base.backend import KVBackend

from .config import ZmqConfig
from .manager import ZmqKVManager


def _manager(role, layout, tp, config: ZmqConfig, link) -> ZmqKVManager:
    return ZmqKVManager(role, layout, bind_host=config.host, ipc_path=config.ipc, tp=tp,
                        layers_per_message=config.layers_per_message, ack_timeout_s=config.ack_timeout_s,
                        fault_hooks=config.fault_hooks, curve=link.curve, recv_writers=config.recv_writers)


BACKEND = KVBackend("zmq", ZmqConfig, _manager, worker=("pdserve.kv_transfer.zmq.connector", "ZmqConnector"))
