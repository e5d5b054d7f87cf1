"""The fake backend: in-process, completes at once (manager.py)."""
from __future__ import annotations

from pdserve.kv_transfer.base.backend import KVBackend

from .config import FakeConfig
from .manager import FakeKVManager


def _manager(role, layout, tp, config: FakeConfig, link) -> FakeKVManager:
    return FakeKVManager(role, layout, tp)


BACKEND = KVBackend("fake", FakeConfig, _manager)
