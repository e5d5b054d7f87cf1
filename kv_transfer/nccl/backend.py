"""The NCCL backend: the engine's ranks move the data (connector.py over RankKV), the
manager pairs the nodes and sends the control messages."""
from __future__ import annotations

from pdserve.kv_transfer.base.backend import KVBackend

from .config import NcclConfig
from .manager import NcclKVManager


def _manager(role, layout, tp, config: NcclConfig, link) -> NcclKVManager:
    return NcclKVManager(role, layout, link, bind_host=config.host, tp=tp)


BACKEND = KVBackend("nccl", NcclConfig, _manager, worker=("pdserve.kv_transfer.nccl.connector", "NcclConnector"))
