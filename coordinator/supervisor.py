"""`pdserve coordinator --workers N`: the parent process. It owns the node registry and
model admission, and serves them to its workers on a loopback port (never to
clients): the node API the workers forward (Register, Heartbeat), the node table
they mirror (WatchNodes), fencing (Fence), their reports (Report) and `status`.

It starts N worker processes (worker.py) that serve the client API on the
coordinator's one port with SO_REUSEPORT; the port is held bound here for the whole
run, so port 0 resolves once and a restarted worker gets the same one; so is the
HTTP API's port (--http-listen), which the workers share the same way. A worker that
dies is started again under a new subscriber id: its clients' calls end UNAVAILABLE
(their connection drops), and the nodes free its requests when its token streams
end. SIGTERM drains the workers, then stops the supervisor."""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import grpc
from prometheus_client import multiprocess

from pdserve.common.config import CoordinatorConfig
from pdserve.common.flags import to_argv
from pdserve.common.prom import MetricsServer
from pdserve.coordinator import metrics
from pdserve.coordinator.model import ServedModel
from pdserve.coordinator.registry import NodeEntry, Registry
from pdserve.wire.protocol import PROTOCOL_VERSION
from pdserve.wire.rpc import RpcError, ServerHandle
from pdserve.wire.security import Credentials
from pdserve.v1 import api_pb2, node_pb2, node_pb2_grpc, supervisor_pb2, supervisor_pb2_grpc

log = logging.getLogger("pdserve.coordinator.supervisor")

START_TIMEOUT_S = 120.0  # a worker's start, its tokenizer load included


@dataclass(eq=False)
class WorkerSlot:
    index: int
    subscriber: str = ""
    proc: subprocess.Popen | None = None
    ready: bool = False
    streaming: set[str] = field(default_factory=set)   # node ids whose token stream to it is open
    served: int = 0
    inflight: int = 0
    restarts: int = 0

    def status(self) -> api_pb2.WorkerStatus:
        return api_pb2.WorkerStatus(index=self.index, pid=self.proc.pid if self.proc else 0, ready=self.ready,
                                    served=self.served, inflight=self.inflight, restarts=self.restarts)


class Supervisor(node_pb2_grpc.CoordinatorServicer, supervisor_pb2_grpc.SupervisorServicer):
    def __init__(self, cfg: CoordinatorConfig, workers: int):
        self.cfg = cfg
        self.creds = Credentials.member(cfg.security, cfg.api_key, cfg.api_key_file)
        # the workers' link: loopback, no TLS, a token of this run that only they get (on their stdin)
        self.link_token = secrets.token_urlsafe(32)
        self.registry = Registry(cfg.heartbeat_interval_s, expiry_s=cfg.node_expiry_s, creds=self.creds)
        self.model = ServedModel(cfg.model)
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self.run_id = uuid.uuid4().hex[:8]
        self.version = 0
        self._change = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self.fatal = False
        self.stopped = asyncio.Event()

    async def start(self) -> str:
        self.creds.check_listen(self.cfg.listen, "the coordinator")
        if self.cfg.http_listen:
            self.creds.check_http_listen(self.cfg.http_listen)
        # the workers' metric values, summed by whoever scrapes (coordinator/metrics.py); gone at close
        self.metrics_dir = tempfile.mkdtemp(prefix=f"pdserve-metrics-{self.run_id}-")
        await self.model.start()
        self.internal = ServerHandle("127.0.0.1:0", ["pdserve.v1.Supervisor", "pdserve.v1.Coordinator"],
                                     creds=Credentials(secret=self.link_token.encode()))
        supervisor_pb2_grpc.add_SupervisorServicer_to_server(self, self.internal.server)
        node_pb2_grpc.add_CoordinatorServicer_to_server(self, self.internal.server)
        self.internal_address = await self.internal.start()
        await self.internal.ready()
        self.port, self.address = reserve_port(self.cfg.listen)
        self.http_port, self.http_address = reserve_port(self.cfg.http_listen) if self.cfg.http_listen else (None, None)
        await asyncio.gather(*(self._launch(slot) for slot in self.slots))
        for slot in self.slots:
            self._spawn(self._keep(slot))
        self._spawn(self._watch())
        self.metrics_server = None
        exposition = metrics.watch(self.registry, self.metrics_dir)
        if self.cfg.metrics_listen:
            self.metrics_server = MetricsServer(self.cfg.metrics_listen, exposition)
            log.info("metrics on http://%s/metrics", self.metrics_server.start())
        log.info("%d workers serve %s", len(self.slots), self.address)
        return self.address

    async def close(self, grace_s: float = 5.0) -> None:
        """Drain every worker (SIGTERM: each finishes its streams within grace_s), then stop."""
        self.closing = True
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await _in_thread(p.wait, grace_s + 5.0)
            except subprocess.TimeoutExpired:
                p.kill()
                await _in_thread(p.wait)
        for task in list(self.tasks):
            task.cancel()
        await self.internal.drain(1.0)
        for node_id in list(self.registry.nodes):
            self.registry.remove(node_id)
        self.port.close()
        if self.http_port is not None:
            self.http_port.close()
        self.model.close()
        if getattr(self, "metrics_server", None) is not None:
            await _in_thread(self.metrics_server.close)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    # workers

    def _command(self, slot: WorkerSlot) -> list[str]:
        # the limits hold per worker: clients' connections spread over the workers unevenly
        # (one gRPC channel is one connection, so a single client reaches one worker only)
        share = replace(self.cfg, listen=self.address, workers=1, metrics_listen=None)
        share.http_listen = self.http_address  # the port held here (reserve_port), or None
        return [sys.executable, "-m", "pdserve", "coordinator", *to_argv(share), *to_argv(self.cfg.security),
                "--switch-interval-us", f"{sys.getswitchinterval() * 1e6:.0f}", "--worker-of", self.internal_address,
                "--worker-index", str(slot.index), "--subscriber", slot.subscriber]

    async def _launch(self, slot: WorkerSlot) -> None:
        """Start a slot's process and wait for its `ready` line."""
        slot.subscriber = f"{self.run_id}-w{slot.index}-{slot.restarts}"
        slot.ready, slot.streaming, slot.served, slot.inflight = False, set(), 0, 0
        # plain Popen and threads: asyncio's child watcher can lose a restarted child's exit status
        slot.proc = proc = subprocess.Popen(self._command(slot), stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                            env={**os.environ, metrics.MULTIPROC_ENV: self.metrics_dir})
        proc.stdin.write(self.link_token.encode() + b"\n")
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(_in_thread(proc.stdout.readline), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        if not line.startswith(b"ready"):
            if proc.poll() is None:
                proc.kill()
            await _in_thread(proc.wait)
            raise RuntimeError(f"worker {slot.index} did not start (exit status {proc.returncode})")
        slot.ready = True
        self._changed()

    async def _keep(self, slot: WorkerSlot) -> None:
        """Start a slot's process again whenever it dies (not while closing)."""
        while True:
            code = await _in_thread(slot.proc.wait)
            if code == 0 and not self.closing:  # drained by a signal (Ctrl-C reaches the whole group)
                await asyncio.sleep(0.5)         # that may be on its way to this process too
            if self.closing:
                return
            slot.ready, slot.streaming = False, set()
            multiprocess.mark_process_dead(slot.proc.pid, self.metrics_dir)  # its gauges leave the live sums
            log.warning("worker %d (pid %d) exited with status %s; starting it again", slot.index, slot.proc.pid, code)
            slot.restarts += 1
            try:
                await self._launch(slot)
            except RuntimeError as e:
                log.error("%s; trying again in 1 s", e)
                await asyncio.sleep(1.0)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # the node API, forwarded by the workers

    async def Register(self, req: node_pb2.RegisterRequest, context) -> node_pb2.RegisterResponse:
        if req.protocol_version != PROTOCOL_VERSION:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"protocol version {req.protocol_version}, coordinator speaks {PROTOCOL_VERSION}")
        self.registry.refuse_taken(req.address)  # before the model check, which may wait for a load
        live = {n.model.compat_hash for n in self.registry.nodes.values() if self.registry.live(n)}
        await self.model.admit(req.model, live)
        node = self.registry.register(req)  # checks the address again: the load may have taken a while
        self._changed()
        log.info("registered %s node %s at %s", api_pb2.Role.Name(node.role), node.id, node.address)
        return node_pb2.RegisterResponse(node_id=node.id, epoch=node.epoch,
                                         heartbeat_interval_s=self.cfg.heartbeat_interval_s,
                                         **self.registry.peers(node))

    async def Heartbeat(self, req: node_pb2.HeartbeatRequest, context) -> node_pb2.HeartbeatResponse:
        if not self.registry.heartbeat(req):
            return node_pb2.HeartbeatResponse(known=False)
        self._changed()
        node = self.registry.nodes[req.node_id]
        return node_pb2.HeartbeatResponse(known=True, want_full_cache=node.cache.want_full, **self.registry.peers(node))

    # what the workers see and tell

    async def WatchNodes(self, req: supervisor_pb2.WatchRequest, context):
        sent: dict[str, int] = {}  # node id -> the cache version this stream has
        while True:
            version, change = self.version, self._change
            await context.write(self._table(sent))
            if self.version == version:
                try:
                    await asyncio.wait_for(change.wait(), self.cfg.heartbeat_interval_s)
                except asyncio.TimeoutError:
                    pass

    def _table(self, sent: dict[str, int]) -> supervisor_pb2.NodeTable:
        """The table for one worker's stream; each node's cached blocks as the change since
        the cache version this stream has (sent: node id -> version; updated)."""
        now = time.monotonic()
        table = supervisor_pb2.NodeTable()
        for n in self.registry.nodes.values():
            full, added, removed = n.cache.since(sent.get(n.id, 0))
            table.nodes.append(supervisor_pb2.NodeRecord(
                id=n.id, role=n.role, address=n.address, kv_endpoint=n.kv_endpoint, tp=n.tp, model=n.model,
                epoch=n.epoch, kv_blocks_total=n.kv_blocks_total, kv_blocks_free=n.kv_blocks_free, running=n.running,
                queued=n.queued, queued_tokens=n.queued_tokens, silent_s=now - n.last_seen, down=n.down,
                counters=n.counters, cache_version=n.cache.version, cache_full=full, cache_added=added,
                cache_removed=removed, kv_curve_key=n.kv_curve_key))
        sent.clear()
        sent.update((n.id, n.cache.version) for n in self.registry.nodes.values())
        if self.model.info is not None:
            table.model.CopyFrom(self.model.info)
        return table

    async def Fence(self, req: supervisor_pb2.FenceRequest, context) -> supervisor_pb2.FenceResponse:
        node = self.registry.nodes.get(req.node_id)
        if node is not None and node.epoch == req.epoch:
            self._fence(node, f"{req.reason} (seen by worker {req.worker})")
        return supervisor_pb2.FenceResponse()

    async def Report(self, req: supervisor_pb2.WorkerReport, context) -> supervisor_pb2.ReportResponse:
        slot = self.slots[req.worker] if req.worker < len(self.slots) else None
        if slot is not None and slot.proc is not None and slot.proc.pid == req.pid:  # not a dead predecessor's
            slot.streaming, slot.served, slot.inflight = set(req.streaming), req.served, req.inflight
        return supervisor_pb2.ReportResponse()

    async def Status(self, req: api_pb2.StatusRequest, context) -> api_pb2.StatusResponse:
        resp = api_pb2.StatusResponse(nodes=[n.status(self._healthy(n)) for n in self.registry.nodes.values()],
                                      workers=[s.status() for s in self.slots])
        info = self.model.info
        if info is not None:
            resp.model, resp.vocab_size, resp.max_model_len = info.name, info.vocab_size, info.max_model_len
        return resp

    def _healthy(self, node: NodeEntry) -> bool:
        """Live, and for a decode node, streaming to every ready worker."""
        if not self.registry.live(node):
            return False
        ready = [s for s in self.slots if s.ready]
        if node.role == api_pb2.ROLE_PREFILL:
            return self.registry.known_to_peers(node)
        return bool(ready) and all(node.id in s.streaming for s in ready)

    # node health

    def _changed(self) -> None:
        self.version += 1
        self._change.set()
        self._change = asyncio.Event()

    def _fence(self, node: NodeEntry, why: str) -> None:
        if not node.down:
            node.down = True
            log.warning("node %s (%s) %s", node.id, api_pb2.Role.Name(node.role), why)
            self._changed()

    async def _watch(self) -> None:
        """Fence off silent nodes, forget long-silent ones."""
        await self.registry.watch("supervisor", lambda n: self._fence(n, "missed its heartbeats"),
                                  lambda n: self._changed())


def _in_thread(fn, *args) -> asyncio.Future:
    """fn(*args) on a thread of its own (a wait per worker must not fill the default executor)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(value, error) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(value)

    def run() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 (handed to the awaiting coroutine)
            value, error = None, e
        loop.call_soon_threadsafe(settle, value, error)
    threading.Thread(target=run, daemon=True, name="pdserve-worker-wait").start()
    return fut


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind listen's address with SO_REUSEPORT and keep it: the workers bind the same port.
    Returns the socket and the address with the port resolved."""
    host, port = listen.rsplit(":", 1)
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, int(port)))
    except OSError:
        sock.close()
        raise
    return sock, f"{host}:{sock.getsockname()[1]}"
