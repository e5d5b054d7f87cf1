"""The faults of the chaos harness, one at a time on a running pdserve.cluster.Cluster:
each injects, heals (restarts what it killed, wakes what it froze) and returns the
monotonic time it struck. Members are found by role from the cluster's processes,
coordinator workers from `status`."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

from pdserve.client import status

FAULTS = ("kill-prefill", "stop-prefill", "kill-decode", "stop-decode", "kill-worker", "stop-worker",
          "kill-coordinator", "stop-coordinator", "kv-cut", "kv-corrupt", "stalled-client", "burst")


class Faults:
    def __init__(self, cluster, load, stop_s: float = 3.0, burst: int = 64, ready_timeout_s: float = 120.0,
                 stall_wait_s: float = 4.0):
        """stop_s: how long a SIGSTOP lasts (longer than the coordinator's 3 missed heartbeats);
        burst: requests of the burst fault; stall_wait_s: how long the stalled client reads
        nothing (longer than the coordinator's --client-stall-timeout)."""
        self.cluster, self.load, self.stop_s, self.burst_n = cluster, load, stop_s, burst
        self.stall_wait_s = stall_wait_s
        self.ready_timeout_s = ready_timeout_s
        self.address = cluster.cfg.listen
        self.stalled: StalledStream | None = None

    def inject(self, fault: str) -> float:
        """Strike, heal, and return when it struck."""
        fn: Callable[[], float] = getattr(self, fault.replace("-", "_"))
        return fn()

    # members

    def _member(self, role: str):
        """The first live process of a role (coordinator: the supervisor)."""
        for p in self.cluster.procs:
            args = list(p.args)
            r = args[args.index("--role") + 1] if "--role" in args else "coordinator"
            if r == role and p.poll() is None:
                return p
        raise LookupError(f"no live {role} process")

    def _restart(self, proc) -> None:
        """Start a killed member again with its command line (nodes take a new port)."""
        proc.wait()
        procs = self.cluster.procs
        i = procs.index(proc)
        fresh = self.cluster._spawn(list(proc.args))
        procs.remove(fresh)
        procs[i] = fresh

    def wait_healthy(self) -> None:
        """Until every node the cluster started is healthy again (and every worker ready)."""
        want = len(self.cluster.procs) - 1
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                st = status(self.address, timeout=2.0)
                if (sum(n["healthy"] for n in st["nodes"]) >= want
                        and all(w["ready"] for w in st["workers"])):
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the cluster did not heal within {self.ready_timeout_s} s")

    def _kill(self, role: str) -> float:
        proc = self._member(role)
        at = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)  # its group: a supervisor's workers, a node's TP ranks
        self._restart(proc)
        self.wait_healthy()
        return at

    def _stop(self, pid: int, group: bool = False) -> float:
        send = (lambda s: os.killpg(pid, s)) if group else (lambda s: os.kill(pid, s))
        at = time.monotonic()
        send(signal.SIGSTOP)
        try:
            time.sleep(self.stop_s)
        finally:
            send(signal.SIGCONT)
        self.wait_healthy()
        return at

    def kill_prefill(self) -> float:
        return self._kill("prefill")

    def kill_decode(self) -> float:
        return self._kill("decode")

    def kill_coordinator(self) -> float:
        return self._kill("coordinator")

    def stop_prefill(self) -> float:
        return self._stop(self._member("prefill").pid)

    def stop_decode(self) -> float:
        return self._stop(self._member("decode").pid)

    def stop_coordinator(self) -> float:
        return self._stop(self._member("coordinator").pid, group=True)

    def _worker_pid(self) -> int:
        workers = steady_status(self.address)["workers"]
        if not workers:
            raise LookupError("the coordinator has no workers (--workers 1)")
        return workers[0]["pid"]

    def kill_worker(self) -> float:
        pid = self._worker_pid()
        at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + self.ready_timeout_s
        while self._worker_pid() == pid and time.monotonic() < deadline:  # the supervisor starts another
            time.sleep(0.2)
        self.wait_healthy()
        return at

    def stop_worker(self) -> float:
        return self._stop(self._worker_pid())

    # the KV link (a prefill node started with --kv-fault-hooks: kv_transfer/base/faults.py)

    def _arm(self, sig: int) -> float:
        """Every prefill node: the next transfer of whichever gets one strikes (the others lapse)."""
        at = time.monotonic()
        for p in self.cluster.procs:
            if "prefill" in list(p.args) and p.poll() is None:
                os.kill(p.pid, sig)
        return at

    def kv_cut(self) -> float:
        return self._arm(signal.SIGUSR1)

    def kv_corrupt(self) -> float:
        return self._arm(signal.SIGUSR2)

    # clients

    def stalled_client(self) -> float:
        """A request whose client never reads; the coordinator must end it (its stall timeout)."""
        prompt = self.load.prompts[0]
        self.stalled = StalledStream(self.address, prompt, max_tokens=400)
        at = time.monotonic()
        time.sleep(self.stall_wait_s)  # past the coordinator's --client-stall-timeout: it must have ended it
        return at

    def burst(self) -> float:
        self.load.burst(self.burst_n)
        return time.monotonic()


def leaked_blocks(address: str, timeout_s: float = 15.0) -> tuple[int, list[dict]]:
    """Blocks not back at baseline on the healthy nodes once nothing runs (waits up to timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = [n for n in steady_status(address)["nodes"] if n["healthy"]]
        leaked = sum(n["kv_blocks_total"] - n["kv_blocks_free"] for n in nodes)
        if (leaked == 0 and not any(n["running"] for n in nodes)) or time.monotonic() > deadline:
            return leaked, nodes
        time.sleep(0.25)


def steady_status(address: str, timeout_s: float = 30.0) -> dict:
    """`status`, asked again while a fault leaves the coordinator briefly unreachable (a worker
    that died with the connection this process had to it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return status(address, timeout=2.0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class StalledStream:
    """Generate over raw HTTP/2 with a tiny flow-control window that is never reopened: the
    server's writes block. status() reads the call's trailers once the window is opened."""

    def __init__(self, address: str, prompt: list[int], max_tokens: int, window: int = 1024):
        """window: the stream's flow-control window; 1024 lets the first responses through (a
        window smaller than the first response meets a known bug: see the report of issue 24)."""
        import h2.config
        import h2.connection
        import h2.settings
        from pdserve.v1 import api_pb2
        req = api_pb2.GenerateRequest(sampling=api_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                      ignore_eos=True))
        req.token_ids.ids.extend(prompt)
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, [(":method", "POST"), (":scheme", "http"),
                                          (":path", "/pdserve.v1.Generation/Generate"), (":authority", address),
                                          ("content-type", "application/grpc"), ("te", "trailers")])
        body = req.SerializeToString()
        self.conn.send_data(self.sid, b"\0" + struct.pack(">I", len(body)) + body, end_stream=True)
        self.lock = threading.Lock()
        self.sock.sendall(self.conn.data_to_send())
        self.trailers: dict[str, str] = {}
        self.seen: list[str] = []  # the h2 events received, by type
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import h2.events
        while True:
            try:
                data = self.sock.recv(65536)
                with self.lock:
                    events = self.conn.receive_data(data) if data else []
                    out = self.conn.data_to_send()
            except Exception:
                break
            if not data:
                break
            for ev in events:
                self.seen.append(type(ev).__name__)
                if isinstance(ev, h2.events.TrailersReceived):
                    self.trailers = {_s(k): _s(v) for k, v in ev.headers}
                if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.TrailersReceived)):
                    self.ended.set()
            if out:
                self.sock.sendall(out)
        self.ended.set()

    def finish(self, timeout: float) -> str:
        """Open the windows, wait for the end; the status' code name ("lost" if none came)."""
        import grpc
        with self.lock:
            self.conn.increment_flow_control_window(1 << 24)
            self.conn.increment_flow_control_window(1 << 24, stream_id=self.sid)
            self.sock.sendall(self.conn.data_to_send())
        self.ended.wait(timeout)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        if "grpc-status" not in self.trailers:
            return "lost"
        code = int(self.trailers["grpc-status"])
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else x
