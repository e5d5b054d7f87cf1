"""A node's link to the coordinator: register, then heartbeat with load figures.
If the coordinator forgets the node (restart), the next heartbeat re-registers it."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.wire.rpc import channel
from pdserve.wire.security import NONE, Credentials
from pdserve.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger("pdserve.node")

RECONNECT_BACKOFF_S = 1.0  # the longest wait between attempts to reach the coordinator again
# a registration refused with one of these may pass later: the coordinator is starting or
# busy (loading a tokenizer), or still holds a live entry at this address until it goes stale
RETRY_REGISTER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED}


class NodeAgent:
    def __init__(self, coordinator: str, register: Callable[[], node_pb2.RegisterRequest],
                 load: Callable[[], node_pb2.HeartbeatRequest],
                 on_peers: Callable[[list[node_pb2.Peer]], None] | None = None,
                 on_registered: Callable[[int], None] | None = None,
                 on_want_full_cache: Callable[[], None] | None = None, creds: Credentials = NONE):
        """on_peers receives the coordinator's list of live peers after every registration
        and heartbeat: decode nodes for a prefill node (it sets up its KV transport towards
        them), prefill nodes for a decode node. on_registered receives the new epoch after
        every successful (re-)registration. on_want_full_cache: the coordinator asked for
        the node's whole prefix-cache list with the next heartbeat."""
        self.coordinator, self.creds = coordinator, creds
        self.make_register, self.make_load = register, load
        self.on_peers, self.on_registered = on_peers, on_registered
        self.on_want_full_cache = on_want_full_cache
        self.node_id, self.epoch, self.interval = "", 0, 1.0
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        # a coordinator restarted after a long outage is found again within a second
        self.channel = channel(self.coordinator, self.creds, max_backoff_s=RECONNECT_BACKOFF_S)
        self.stub = node_pb2_grpc.CoordinatorStub(self.channel)
        await self._register(wait_s=30.0)
        self.task = asyncio.create_task(self._beat())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()

    async def _register(self, wait_s: float) -> None:
        """Register, retrying refusals that may pass (RETRY_REGISTER) for up to wait_s."""
        req = self.make_register()
        req.protocol_version = PROTOCOL_VERSION
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                resp = await self.stub.Register(req, timeout=max(1.0, min(5.0, deadline - loop.time())))
                break
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRY_REGISTER or loop.time() > deadline:
                    raise
                log.info("registration refused (%s: %s); retrying", e.code().name, e.details())
                await asyncio.sleep(0.2 if e.code() == grpc.StatusCode.UNAVAILABLE else 0.5)
        self.node_id, self.epoch, self.interval = resp.node_id, resp.epoch, resp.heartbeat_interval_s
        log.info("registered as %s (epoch %d)", self.node_id, self.epoch)
        self._peers(resp)
        if self.on_registered is not None:
            self.on_registered(self.epoch)

    def _peers(self, resp) -> None:
        if self.on_peers is not None:
            self.on_peers(list(resp.decode_peers) + list(resp.prefill_peers))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                req = self.make_load()
                req.node_id, req.epoch = self.node_id, self.epoch
                resp = await self.stub.Heartbeat(req, timeout=max(1.0, self.interval))
            except grpc.aio.AioRpcError as e:
                log.warning("heartbeat failed: %s", e.code().name)
                continue
            try:
                if not resp.known:
                    await self._register(wait_s=max(3.0, 3 * self.interval))
                else:
                    self._peers(resp)
                    if resp.want_full_cache and self.on_want_full_cache is not None:
                        self.on_want_full_cache()
            except grpc.aio.AioRpcError as e:  # tried again at the next heartbeat
                log.warning("registering again failed: %s: %s", e.code().name, e.details())
            except Exception:  # a bug in a callback must not stop the heartbeats
                log.exception("after a heartbeat")
