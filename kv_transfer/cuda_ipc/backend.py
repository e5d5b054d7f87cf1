"""The cuda-ipc backend: the engine's ranks copy the data (connector.py), the manager
pairs the nodes, grants writes and sends the control messages."""
from __future__ import annotations

from pdserve.kv_transfer.base.backend import KVBackend

from .config import IpcConfig
from .manager import IpcKVManager


def _manager(role, layout, tp, config: IpcConfig, link) -> IpcKVManager:
    return IpcKVManager(role, layout, link, config, tp=tp)


BACKEND = KVBackend("cuda-ipc", IpcConfig, _manager, worker=("pdserve.kv_transfer.cuda_ipc.connector", "IpcConnector"))
