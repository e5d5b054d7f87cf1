"""A KV backend as the registry hands it out: its config dataclass, how a node makes
its manager, and which KV connector worker (if any) each TP rank of its engine runs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pdserve.engine.kv_connector import KVConnectorSpec

from .conn import KVManager, NodeLink, Role
from .layout import KVLayout

# manager(role, layout, tp, config, link)
ManagerFactory = Callable[[Role, KVLayout, int, Any, NodeLink], KVManager]


@dataclass(frozen=True)
class KVBackend:
    name: str
    config_class: type
    manager: ManagerFactory
    worker: tuple[str, str] | None = None   # (module, class) of its KVConnectorWorker

    def connector(self, config: Any) -> KVConnectorSpec | None:
        """The spec the engine builds a worker from on every TP rank (None: no engine-side part)."""
        if self.worker is None:
            return None
        return KVConnectorSpec(*self.worker, asdict(config))
