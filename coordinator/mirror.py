"""A worker's copy of the supervisor's node table (`pdserve coordinator --workers N`).

The supervisor owns registrations, epochs, heartbeats and fencing; it streams its
whole table (WatchNodes) whenever it changes and once per heartbeat interval. A
worker applies each table to its own Registry: new nodes get a channel and, for
decode and colocated nodes, this worker's own token stream; loads and heartbeat
ages are copied, so routing and liveness read as in a single coordinator; a node the
supervisor fenced off or forgot is lost here too (its requests migrate or retry)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.coordinator.lifecycle import Lifecycle
from pdserve.coordinator.model import ServedModel
from pdserve.coordinator.registry import NodeEntry, Registry
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, supervisor_pb2

log = logging.getLogger("pdserve.coordinator")


class Mirror:
    def __init__(self, registry: Registry, lifecycle: Lifecycle, model: ServedModel,
                 subscribe: Callable[[NodeEntry], None], unsubscribe: Callable[[str], None]):
        self.registry, self.lifecycle, self.model = registry, lifecycle, model
        self.subscribe, self.unsubscribe = subscribe, unsubscribe
        self.first = asyncio.Event()  # set once a table was applied
        self.failed = ""              # the model whose tokenizer failed to load last

    async def apply(self, table: supervisor_pb2.NodeTable) -> None:
        if table.HasField("model"):
            try:
                await self.model.follow(table.model)
            except RpcError as e:  # tried again with the next table; said once
                if self.failed != table.model.compat_hash:
                    self.failed = table.model.compat_hash
                    log.warning("cannot serve %s yet: %s", table.model.name, e.message)
        now = time.monotonic()
        listed = set()
        for rec in table.nodes:
            listed.add(rec.id)
            node = self.registry.nodes.get(rec.id)
            if node is None:
                node = self.registry.add(NodeEntry(id=rec.id, role=rec.role, address=rec.address,
                                                   kv_endpoint=rec.kv_endpoint, tp=rec.tp, model=rec.model,
                                                   epoch=rec.epoch, kv_blocks_total=rec.kv_blocks_total,
                                                   kv_curve_key=rec.kv_curve_key))
                if node.role != api_pb2.ROLE_PREFILL and not rec.down:
                    self.subscribe(node)
            node.kv_blocks_free, node.running, node.queued = rec.kv_blocks_free, rec.running, rec.queued
            node.queued_tokens, node.last_seen = rec.queued_tokens, now - rec.silent_s
            node.counters = rec.counters
            if rec.cache_version != node.cache.version:
                node.cache.patch(rec.cache_version, rec.cache_full, rec.cache_added, rec.cache_removed)
            if rec.down:
                self.lifecycle.node_lost(node, "was fenced off", tell=False)
        for node_id in [i for i in self.registry.nodes if i not in listed]:
            self.lifecycle.node_lost(self.registry.nodes[node_id], "left the registry", tell=False)
            self.unsubscribe(node_id)
            self.registry.remove(node_id)
        self.lifecycle.freed()  # free blocks may have grown
        self.first.set()

    async def wait_streaming(self, timeout_s: float) -> bool:
        """Until this worker's token stream of every live decode node is open (False: timed out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if all(n.streaming for n in self.registry.nodes.values()
                   if n.role != api_pb2.ROLE_PREFILL and self.registry.live(n)):
                return True
            await asyncio.sleep(0.02)
        return False
