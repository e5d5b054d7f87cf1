"""A coordinator and synthetic nodes (pdserve.synthetic_node) as child processes on
loopback: what the relay benchmark and the relay tests drive."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import grpc

from pdserve.client import status
from pdserve.cluster import free_port
from pdserve.common.config import CoordinatorConfig


def coordinator_workers() -> bool:
    """Whether `pdserve coordinator` takes --workers in this tree."""
    return any(f.name == "workers" for f in dataclasses.fields(CoordinatorConfig))


class SyntheticCluster:
    def __init__(self, nodes: int = 1, role: str = "both", workers: int = 1, node_flags: tuple[str, ...] = (),
                 coordinator_flags: tuple[str, ...] = (), log_dir: str | None = None):
        if workers > 1 and not coordinator_workers():
            raise ValueError("this coordinator has no --workers: run it with 1 worker")
        self.nodes, self.role, self.workers = nodes, role, workers
        self.node_flags, self.coordinator_flags = list(node_flags), list(coordinator_flags)
        self.log_dir = Path(log_dir) if log_dir else None
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.logs = []

    def __enter__(self) -> "SyntheticCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "w")
            self.logs.append(out)
        p = subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start(self, timeout_s: float = 120.0) -> str:
        workers = ["--workers", str(self.workers)] if coordinator_workers() else []
        self._spawn("coordinator", ["pdserve", "coordinator", "--listen", self.address, *workers,
                                    *self.coordinator_flags])
        for i in range(self.nodes):
            self._spawn(f"node{i}", ["pdserve.synthetic_node", "--coordinator", self.address, "--role", self.role,
                                     *self.node_flags])
        self.wait_healthy(self.nodes * (1 if self.role == "both" else 2), timeout_s)
        return self.address

    def wait_healthy(self, expected: int, timeout_s: float) -> None:
        """Until `expected` nodes are healthy in several status answers in a row (with
        several workers each answer may come from another one)."""
        deadline, in_a_row = time.monotonic() + timeout_s, 0
        while in_a_row < 2 * self.workers + 1:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"exited during start: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expected} synthetic nodes not healthy at {self.address}")
            try:
                healthy = sum(n["healthy"] for n in status(self.address, timeout=2.0)["nodes"])
            except grpc.RpcError:
                healthy = 0
            in_a_row = in_a_row + 1 if healthy >= expected else 0
            time.sleep(0.1)

    def stop(self) -> None:
        for p in reversed(self.procs):  # nodes first: the coordinator sees them leave
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        self.procs, self.logs = [], []
