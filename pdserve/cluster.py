"""`pdserve up`: a coordinator and prefill/decode pools as child processes on this
machine, stopped together on Ctrl-C or SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pdserve.common.config import ClientConfig, CoordinatorConfig, EngineConfig, NodeConfig, SecurityConfig
from pdserve.common.flags import opt, to_argv
from pdserve.kv_transfer.cuda_ipc.config import IpcConfig
from pdserve.kv_transfer.nccl.config import NcclConfig
from pdserve.kv_transfer.registry import resolve


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for a coordinator address chosen before it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ClusterConfig:
    prefill: int = opt(1, "prefill nodes")
    decode: int = opt(1, "decode nodes")
    colocated: int = opt(0, "N colocated nodes (--role both, TP --decode-tp) instead of the two pools")
    prefill_tp: int = opt(1, "tensor-parallel ranks of each prefill node")
    decode_tp: int = opt(1, "tensor-parallel ranks of each decode (or colocated) node")
    model: str | None = opt(None, "checkpoint folder or .gguf file (default: the default model)")
    device: str = opt("auto", "auto (one GPU per TP rank if CUDA is there, else CPU), cpu, cuda, or cuda:N "
                              "(every node shares GPU N: tests and one-GPU benchmarks)")
    listen: str = opt(CoordinatorConfig.listen, "the coordinator's HOST:PORT")
    http_listen: str | None = opt(None, "HOST:PORT of the coordinator's OpenAI-compatible HTTP API (off unless given)")
    kv_blocks: int | None = opt(None, "each node's KV pool size in blocks")
    dtype: str = EngineConfig.dtype
    load_format: str = EngineConfig.load_format  # dummy: random weights from config.json (benchmarks)
    max_num_seqs: int = opt(EngineConfig.max_num_seqs, "each node's batch size limit")
    max_num_batched_tokens: int = opt(EngineConfig.max_num_batched_tokens, "each node's step token limit")
    heartbeat_interval_s: float = CoordinatorConfig.heartbeat_interval_s
    max_inflight: int = CoordinatorConfig.max_inflight
    workers: int | None = opt(None, "the coordinator's frontend processes (its --workers; default: from the cores)")
    coordinator: bool = True           # False: the pools join the coordinator already at `listen`
    coordinator_flags: tuple[str, ...] = ()  # more `pdserve coordinator` flags (--lease, --max-queued, ...)
    node_flags: tuple[str, ...] = ()   # more flags for every node
    ready_timeout_s: float = 300.0
    log_dir: str | None = None        # members' logs go here (one file each) instead of this terminal
    kv_transport: str = opt(NodeConfig.kv_transport, "KV data plane of the prefill and decode pools (auto: "
                                                      "cuda-ipc on CUDA, zmq on CPU)",
                            choices=("auto", "zmq", "nccl", "cuda-ipc"))
    shared_gpu_prefill_memory: float = opt(0.3, "one GPU for more nodes than GPUs (TP 1, one decode node): each "
                                                "prefill node's --gpu-memory-utilization; they start first, the "
                                                "decode node then takes its share of what is left")
    kv_timeout_s: float | None = None  # nccl, cuda-ipc: --kv-timeout of the nodes (None: theirs)
    kv_min_message_mib: float | None = None  # nccl: --kv-min-message-mib (None: theirs)
    kv_max_ctas: int | None = None     # nccl: --kv-max-ctas (None: theirs)
    cores_per_member: int = 0          # >0: member i (coordinator 0, then the nodes) runs on physical cores [i*n, (i+1)*n)
    switch_interval_us: float | None = None  # every member's --switch-interval-us (None: theirs)
    prefill_graphs: bool = EngineConfig.prefill_graphs  # False: the nodes run steps with prompt tokens eagerly
    metrics: bool = opt(False, "every member serves Prometheus metrics (--metrics-listen) on a free loopback port "
                               "of its own, listed at start")
    security: SecurityConfig = field(default_factory=SecurityConfig)  # every member's TLS and cluster secret
    api_key: str | None = None         # the coordinator requires it of clients (and `up` shows it when it polls)

    def client(self):
        """The credentials `up` polls the coordinator with: its members' TLS identity and the API key."""
        from pdserve.wire.security import Credentials
        s = self.security
        return Credentials.client(ClientConfig(tls_cert=s.tls_cert, tls_key=s.tls_key, tls_ca=s.tls_ca,
                                               tls_server_name=s.tls_server_name, api_key=self.api_key))


class Cluster:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.procs: list[subprocess.Popen] = []
        self.metrics: dict[str, str] = {}  # with cfg.metrics: member ("coordinator", "decode-0", ...) -> HOST:PORT
        self.shared_gpu = False   # every node on cuda:0, started one after the other

    def _share_one_gpu(self, gpus: int) -> bool:
        """More nodes than GPUs: all on one GPU where that can work (every TP 1, one decode
        or colocated node, which starts last and takes what the others left)."""
        cfg = self.cfg
        need = cfg.prefill * cfg.prefill_tp + (cfg.decode + cfg.colocated) * cfg.decode_tp
        if need <= gpus or gpus < 1:
            return False
        if cfg.prefill_tp != 1 or cfg.decode_tp != 1 or cfg.decode + cfg.colocated != 1:
            raise ValueError(f"not enough GPUs: the pools need {need}, {gpus} found (one GPU is shared only by "
                             f"TP 1 nodes with one decode node)")
        if cfg.kv_transport == "nccl":
            raise ValueError("NCCL cannot pair two nodes on one GPU: use --kv-transport cuda-ipc (or auto) to share it")
        return True

    def node_commands(self) -> list[list[str]]:
        """Each node's command line, rendered from the node and engine configs it should run with."""
        cfg = self.cfg
        device = cfg.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gpus = 0
        if device == "cuda":
            import torch
            gpus = torch.cuda.device_count()
        nccl = NcclConfig(**{k: v for k, v in (("timeout_s", cfg.kv_timeout_s), ("max_ctas", cfg.kv_max_ctas),
                                               ("min_message_mib", cfg.kv_min_message_mib)) if v is not None})
        self.shared_gpu = device == "cuda" and self._share_one_gpu(gpus)
        ipc = IpcConfig(**({"timeout_s": cfg.kv_timeout_s} if cfg.kv_timeout_s is not None else {}))
        next_gpu, cmds = 0, []
        pools = (("prefill", cfg.prefill, cfg.prefill_tp), ("decode", cfg.decode, cfg.decode_tp),
                 ("both", cfg.colocated, cfg.decode_tp))
        for role, count, tp in pools:
            for _ in range(count):
                node_device = device if device.startswith("cuda:") else "cpu"
                memory = EngineConfig.gpu_memory_utilization
                if self.shared_gpu:
                    node_device = "cuda:0"
                    memory = cfg.shared_gpu_prefill_memory if role == "prefill" else memory
                elif device == "cuda":
                    if next_gpu + tp > gpus:
                        raise ValueError(f"not enough GPUs: the pools need more than the {gpus} found")
                    node_device = f"cuda:{next_gpu}"
                    next_gpu += tp
                transport = resolve(cfg.kv_transport if role != "both" else NodeConfig.kv_transport, node_device, role,
                                    cfg.listen)
                engine = EngineConfig(model=cfg.model, tp=tp, device=node_device, dtype=cfg.dtype,
                                      kv_blocks=cfg.kv_blocks, max_num_seqs=cfg.max_num_seqs,
                                      max_num_batched_tokens=cfg.max_num_batched_tokens, load_format=cfg.load_format,
                                      prefill_graphs=cfg.prefill_graphs, gpu_memory_utilization=memory)
                node = NodeConfig(coordinator=cfg.listen, kv_transport=transport, engine=engine,
                                  metrics_listen=self._metrics_address(role))
                cmd = [sys.executable, "-m", "pdserve", "node", "--role", role, *to_argv(node), *to_argv(engine),
                       *to_argv(cfg.security),
                       *(to_argv(nccl, prefix="kv_") if transport == "nccl" else ()),
                       *(to_argv(ipc, prefix="kv_") if transport == "cuda-ipc" else ())]
                if cfg.switch_interval_us is not None:
                    cmd += ["--switch-interval-us", str(cfg.switch_interval_us)]
                cmds.append(cmd + list(cfg.node_flags))
        return cmds

    def coordinator_command(self) -> list[str]:
        cfg = self.cfg
        coordinator = CoordinatorConfig(listen=cfg.listen, model=cfg.model, max_inflight=cfg.max_inflight,
                                        heartbeat_interval_s=cfg.heartbeat_interval_s, workers=cfg.workers,
                                        metrics_listen=self._metrics_address("coordinator"),
                                        http_listen=cfg.http_listen)
        coordinator.api_key = cfg.api_key
        cmd = [sys.executable, "-m", "pdserve", "coordinator", *to_argv(coordinator), *to_argv(cfg.security)]
        if cfg.switch_interval_us is not None:
            cmd += ["--switch-interval-us", str(cfg.switch_interval_us)]
        return cmd + list(cfg.coordinator_flags)

    def _metrics_address(self, role: str) -> str | None:
        if not self.cfg.metrics:
            return None
        name = role if role == "coordinator" else f"{role}-{sum(k.startswith(role + '-') for k in self.metrics)}"
        self.metrics[name] = f"127.0.0.1:{free_port()}"
        return self.metrics[name]

    def start(self) -> None:
        nodes = self.node_commands()
        coordinator = self.coordinator_command()
        if self.cfg.coordinator:
            self._spawn(coordinator)
        for i, cmd in enumerate(nodes):
            self._spawn(cmd)
            if self.shared_gpu:  # the next node sizes its KV pool from what this one left free
                self._wait_ready(i + 1)
        self._wait_ready(len(nodes))

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        log = None
        if self.cfg.log_dir:
            name = cmd[5] if cmd[3] == "node" else cmd[3]
            log = open(os.path.join(self.cfg.log_dir, f"{len(self.procs)}-{name}.log"), "ab")
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        if log is not None:
            log.close()
        if self.cfg.cores_per_member > 0:  # set while the child has one thread: the later ones inherit it
            os.sched_setaffinity(p.pid, member_cpus(len(self.procs), self.cfg.cores_per_member))
        self.procs.append(p)
        return p

    def _wait_ready(self, expected: int) -> None:
        from pdserve.client import status
        creds = self.cfg.client()
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{' '.join(dead[0].args[3:6])} exited with status {dead[0].returncode} "
                                   f"during start-up")
            try:
                nodes = status(self.cfg.listen, timeout=2.0, creds=creds)["nodes"]
                if sum(n["healthy"] for n in nodes) >= expected:
                    return
            except Exception as e:  # not up yet; a refused key will not pass later: say so now
                if getattr(e, "code", None) and e.code().name == "UNAUTHENTICATED":
                    raise RuntimeError(f"the coordinator refused `up`'s status call: {e.details()}") from None
            time.sleep(0.3)
        raise TimeoutError(f"the cluster was not ready within {self.cfg.ready_timeout_s} s")

    def stop(self, grace_s: float = 10.0) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []

    def run(self) -> int:
        """Start, report, and serve until Ctrl-C / SIGTERM or a member dies."""
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.start()
            pools = (f"{self.cfg.colocated} colocated (tp {self.cfg.decode_tp})" if self.cfg.colocated else
                     f"{self.cfg.prefill} prefill (tp {self.cfg.prefill_tp}), {self.cfg.decode} decode "
                     f"(tp {self.cfg.decode_tp})")
            scheme = "https" if self.cfg.security.tls_cert else "http"
            http = f", HTTP API {scheme}://{self.cfg.http_listen}/v1" if self.cfg.http_listen else ""
            print(f"cluster ready: coordinator {self.cfg.listen}{http}, {pools}; Ctrl-C stops it", flush=True)
            for name, address in self.metrics.items():
                print(f"metrics of {name}: http://{address}/metrics", flush=True)
            while all(p.poll() is None for p in self.procs):
                time.sleep(0.5)
            print("a cluster process exited; stopping the rest", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def physical_cores() -> list[list[int]]:
    """This process's allowed logical CPUs grouped by physical core (SMT siblings together),
    in CPU order; each CPU alone where the topology is not readable."""
    allowed, cores, seen = sorted(os.sched_getaffinity(0)), [], set()
    for cpu in allowed:
        if cpu in seen:
            continue
        try:
            text = open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read()
            siblings = sorted(c for c in _cpu_list(text) if c in allowed)
        except (OSError, ValueError):
            siblings = [cpu]
        seen.update(siblings)
        cores.append(siblings)
    return cores


def member_cpus(index: int, per_member: int, cores: list[list[int]] | None = None) -> set[int]:
    """The logical CPUs of member `index`: physical cores [index * per_member, (index + 1) *
    per_member), wrapping around where there are fewer. The same index gets the same cores
    in every cluster, so a role measured in two clusters one after the other (a prefill
    node, a colocated node: both index 1) runs on the same cores."""
    cores = cores if cores is not None else physical_cores()
    return {cpu for i in range(index * per_member, (index + 1) * per_member) for cpu in cores[i % len(cores)]}


def _cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    out = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
