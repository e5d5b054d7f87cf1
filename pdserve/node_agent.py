"""A node's link to the coordinator: register, then heartbeat with load figures.
If the coordinator forgets the node (restart), the next heartbeat re-registers it."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from pdserve.protocol import PROTOCOL_VERSION
from pdserve.rpc import channel
from pdserve.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.node")


class NodeAgent:
    def __init__(self, coordinator: str, register: Callable[[], node_pb2.RegisterRequest],
                 load: Callable[[], node_pb2.HeartbeatRequest],
                 on_peers: Callable[[list[node_pb2.Peer]], None] | None = None):
        """on_peers receives the coordinator's list of live peers after every registration
        and heartbeat: decode nodes for a prefill node (it sets up its KV transport towards
        them), prefill nodes for a decode node."""
        self.coordinator = coordinator
        self.make_register, self.make_load, self.on_peers = register, load, on_peers
        self.node_id, self.epoch, self.interval = "", 0, 1.0
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.channel = channel(self.coordinator)
        self.stub = node_pb2_grpc.CoordinatorStub(self.channel)
        await self._register(wait_s=30.0)
        self.task = asyncio.create_task(self._beat())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()

    async def _register(self, wait_s: float) -> None:
        req = self.make_register()
        req.protocol_version = PROTOCOL_VERSION
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                resp = await self.stub.Register(req, timeout=5.0)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        self.node_id, self.epoch, self.interval = resp.node_id, resp.epoch, resp.heartbeat_interval_s
        log.info("registered as %s (epoch %d)", self.node_id, self.epoch)
        self._peers(resp)

    def _peers(self, resp) -> None:
        if self.on_peers is not None:
            self.on_peers(list(resp.decode_peers) + list(resp.prefill_peers))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            req = self.make_load()
            req.node_id, req.epoch = self.node_id, self.epoch
            try:
                resp = await self.stub.Heartbeat(req, timeout=max(1.0, self.interval))
                if not resp.known:
                    await self._register(wait_s=self.interval * 3)
                else:
                    self._peers(resp)
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat failed: %s", e.code().name)
