"""Every role's configuration, in one torch-free module: each field's default, help
and flag are defined here once (pdserve.common.flags turns them into CLI flags)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve.common.flags import opt
from pdserve.common.model_files import DEFAULT_MODEL

MAX_TOKENS_LIMIT = 32768  # the largest max_tokens a request may ask for
LEASE_S = 30.0  # a decode reservation's lease unless the coordinator asks for another
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROUTING = ("cache-aware", "least-loaded", "round-robin")


@dataclass
class EngineConfig:
    model: str | None = opt(None, f"checkpoint folder or .gguf file (default: {DEFAULT_MODEL})")
    tp: int = opt(1, "tensor-parallel ranks (processes)")
    device: str = opt("cpu", "cpu, cuda or cuda:N (rank r uses cuda:N+r)")
    dtype: str = opt("auto", "auto: float32 on CPU, bfloat16 on GPU", choices=DTYPES)
    block_size: int = opt(16, "tokens per KV block")
    kv_blocks: int | None = opt(None, "KV pool size in blocks (default: derived from free memory)")
    gpu_memory_utilization: float = opt(0.9, "GPU: fraction of free memory for the KV pool")
    max_num_seqs: int = opt(64, "sequences in one batch at most")
    max_num_batched_tokens: int = opt(2048, "tokens in one step at most")
    max_model_len: int | None = opt(None, "longest prompt + output (default: the model's)")
    chunked_prefill: bool = opt(True, "prefill long prompts whole instead of in chunks", off="--no-chunked-prefill")
    prefix_caching: bool = opt(True, "compute and ship every prompt whole instead of reusing the KV of prefixes "
                                     "already cached", off="--no-prefix-caching")
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    enforce_eager: bool = opt(False, "GPU: no CUDA graphs")
    prefill_graphs: bool = opt(True, "GPU: steps with prompt tokens run eagerly (decode-only steps still "
                                     "replay graphs)", off="--no-prefill-graphs")
    load_format: str = opt("auto", "dummy: random weights from config.json alone (benchmarks)",
                           choices=("auto", "dummy"))

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"--tp must be >= 1, got {self.tp}")
        if self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"--kv-blocks must be >= 1, got {self.kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype}")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self):
        import torch  # only engine processes call this
        if self.dtype == "auto":
            return torch.bfloat16 if self.is_cuda else torch.float32
        return getattr(torch, self.dtype)

    def rank_device(self, rank: int):
        import torch
        if not self.is_cuda:
            return torch.device("cpu")
        base = int(self.device.split(":")[1]) if ":" in self.device else 0
        return torch.device("cuda", base + rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        return cls(**json.loads(text))


@dataclass
class TLSConfig:
    """What a gRPC client needs to reach a TLS cluster (every member has these too)."""
    tls_cert: str | None = opt(None, "PEM certificate: this process's identity (server side, and as a client "
                                     "towards a server that asks for one: mutual TLS)")
    tls_key: str | None = opt(None, "PEM private key of --tls-cert")
    tls_ca: str | None = opt(None, "PEM CA bundle: peers' certificates must chain to it; a server given it "
                                   "requires client certificates (mutual TLS)")
    tls_server_name: str | None = opt(None, "the name to check servers' certificates against instead of the "
                                            "host of their address")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_ca)


@dataclass
class SecurityConfig(TLSConfig):
    """A cluster member's credentials: TLS, the cluster join secret, CURVE on the KV plane."""
    cluster_secret_file: str | None = opt(None, "file holding the cluster join secret: members send it on every "
                                                "call between them (Register, Heartbeat, node APIs) and refuse "
                                                "calls without it (UNAUTHENTICATED); turns on CURVE for ZeroMQ KV")
    tls_client_auth: bool = opt(True, "servers given --tls-ca require client certificates of it (mutual TLS); "
                                      "off: TLS alone, members prove themselves with the cluster secret",
                                off="--no-tls-client-auth")
    insecure: bool = opt(False, "allow listening on a non-loopback address without TLS and a cluster secret")

    @property
    def secured(self) -> bool:
        """Credentials enough to leave loopback: TLS, or a join secret (or both)."""
        return self.tls or bool(self.cluster_secret_file)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")


@dataclass
class ClientConfig(TLSConfig):
    """A client's credentials (pdserve generate/status/bench)."""
    api_key: str | None = opt(None, "API key sent with every call (metadata `authorization: Bearer KEY`)")
    api_key_file: str | None = opt(None, "file whose first line is the API key to send")


@dataclass
class NodeConfig:
    coordinator: str = opt(help="the coordinator's gRPC address")
    listen: str = opt("127.0.0.1:0", "HOST:PORT of this node's gRPC server (port 0: any free port)")
    kv_transport: str = opt("auto", "KV backend (kv_transfer/<name>/): auto (cuda-ipc for prefill and decode nodes "
                                    "on CUDA, else zmq), zmq (any hosts), nccl (GPU to GPU; gloo on CPU), cuda-ipc "
                                    "(nodes of one host; host shared memory on CPU) or fake (in-process, tests)")
    kv: Any = None                           # the backend's config (kv_transfer/<name>/config.py); None: its defaults
    local_prefill_tokens: int = opt(0, "decode: prefill a prompt here, with no prefill node and no transfer, when "
                                       "at most this many of its tokens are missing from this node's prefix cache "
                                       "(selective disaggregation; 0: never)")
    max_unread_batches: int = opt(4096, "decode: a token stream (Subscribe) this many step batches behind is ended")
    metrics_listen: str | None = opt(None, "HOST:PORT to serve Prometheus metrics on (GET /metrics; port 0: any "
                                           "free port; default: none)")
    engine: EngineConfig = field(default_factory=EngineConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if self.local_prefill_tokens < 0:
            raise ValueError("--local-prefill-tokens must be >= 0")
        if self.max_unread_batches < 1:
            raise ValueError("--max-unread-batches must be >= 1")


@dataclass
class CoordinatorConfig:
    listen: str = opt("127.0.0.1:50051", "HOST:PORT (binds 127.0.0.1 unless told otherwise)")
    model: str | None = opt(None, "the served model: only nodes of its checkpoint may register (default: agreed "
                                  "with the live nodes; while none is live, the next to register sets it)")
    heartbeat_interval_s: float = opt(0.5, "seconds between node heartbeats; a node missing 3 is fenced off",
                                      flag="--heartbeat-interval")
    max_inflight: int = opt(256, "requests served at once (by each frontend worker)")
    max_queued: int = opt(1024, "requests waiting for a slot or for decode blocks beyond those (in each frontend "
                                "worker); more get RESOURCE_EXHAUSTED")
    lease_s: float = opt(LEASE_S, "seconds a decode reservation lives unless renewed; the coordinator renews it "
                                  "while its request waits", flag="--lease")
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    routing: str = opt("cache-aware", "how a request's prefill (and decode) node is picked: cache-aware (the "
                                      "longest cached prefix weighed against queued work), least-loaded or "
                                      "round-robin", choices=ROUTING)
    max_migrations: int = opt(2, "times a request may move to another decode node when its decode node dies")
    max_retries: int = opt(3, "failed prefill attempts (a node lost, a transfer failed) before UNAVAILABLE")
    max_request_bytes: int = opt(4 << 20, "larger client messages get RESOURCE_EXHAUSTED before any work")
    max_pending_tokens: int = opt(4096, "tokens a client's stream may lag behind its request before the request "
                                        "is ended with RESOURCE_EXHAUSTED (what waits is sent as one message)")
    client_stall_s: float = opt(30.0, "seconds a client may leave its stream unread before it is ended",
                                flag="--client-stall-timeout")
    node_expiry_s: float = opt(30.0, "seconds after which a silent node leaves the registry and `status`",
                               flag="--node-expiry")
    metrics_listen: str | None = opt(None, "HOST:PORT to serve Prometheus metrics on, summed over the workers (GET "
                                           "/metrics; port 0: any free port; default: none)")
    http_listen: str | None = opt(None, "HOST:PORT of the OpenAI-compatible HTTP API, served by the same frontend "
                                        "processes (off unless given; use 127.0.0.1 unless it must be reachable)")
    workers: int | None = opt(None, "frontend processes serving clients on the one port, each relaying its own "
                                    "requests; 1: one process does everything (default: min(8, cores / 2), at "
                                    "least 1)")
    api_key: str | None = opt(None, "clients must send this key (gRPC metadata `authorization: Bearer KEY`; "
                                    "HTTP `Authorization: Bearer KEY`), else UNAUTHENTICATED / 401; HTTP /health, "
                                    "/ready and /metrics stay open)")
    api_key_file: str | None = opt(None, "file of accepted API keys, one a line (# starts a comment); with "
                                         "--api-key both are accepted")
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if self.routing not in ROUTING:
            raise ValueError(f"--routing must be one of {', '.join(ROUTING)}, got {self.routing!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")

    def worker_count(self) -> int:
        """--workers, or the default from the cores this process may run on."""
        if self.workers is not None:
            return self.workers
        return max(1, min(8, len(os.sched_getaffinity(0)) // 2))
