"""`pdserve` command line. Each subcommand builds its component's config from flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from pdserve.common.config import ClientConfig, CoordinatorConfig, EngineConfig, NodeConfig, SecurityConfig
from pdserve.common.flags import add_flags, from_args
from pdserve.common.model_files import chat_prompt
from pdserve.cluster import ClusterConfig
from pdserve.kv_transfer import registry


def add_kv_flags(p: argparse.ArgumentParser) -> None:
    """--kv-<option> for every option of every KV backend; unset ones keep the backend's default."""
    g = p.add_argument_group("KV transport", "options of the --kv-transport backend (each says which take it)")
    users: dict[str, list[str]] = {}
    for name in registry.names():
        for f in dataclasses.fields(registry.config_class(name)):
            users.setdefault(f.name, []).append(name)
    for name in registry.names():
        add_flags(g, registry.config_class(name), prefix="kv_", note=lambda f: ", ".join(users[f.name]) + ": ")


def kv_config(a: argparse.Namespace, transport: str | None = None):
    """The chosen backend's config (transport: --kv-transport resolved) from the --kv-* flags
    given; one it does not take is an error."""
    options = {f.name for name in registry.names() for f in dataclasses.fields(registry.config_class(name))}
    return registry.make_config(transport or a.kv_transport, **{k: getattr(a, "kv_" + k) for k in options})


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", default="", help="comma-separated token ids")
    g.add_argument("--ignore-eos", action="store_true")


def _raw_params(a: argparse.Namespace):
    """Sampling params as given, unvalidated: the server's checks are what every client meets."""
    from pdserve.common.sampling import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, seed=a.seed, repetition_penalty=a.repetition_penalty,
                          presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                          stop=list(a.stop), stop_token_ids=_ids(a.stop_token_ids), ignore_eos=a.ignore_eos)


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"pdserve: token ids must be comma-separated integers, got {text!r}")


def encode_prompt(tokenizer, prompt: str | None, prompt_ids: str | None, chat: bool) -> list[int]:
    if prompt_ids:
        return _ids(prompt_ids)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass --prompt-ids")
    if chat:
        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def cmd_generate(a: argparse.Namespace) -> int:
    if a.prompt is None and not a.prompt_ids:
        print("pdserve generate: give a prompt or --prompt-ids", file=sys.stderr)
        return 2
    if a.coordinator:
        from pdserve.client import build_request, generate
        req = build_request(a.prompt, _ids(a.prompt_ids) if a.prompt_ids else None, a.chat, _raw_params(a),
                            model=a.served_model or "")
        return generate(a.coordinator, req, a.json, a.timeout, client_credentials(a))
    from pdserve.engine.llm_engine import LLMEngine
    t_start = time.monotonic()
    with LLMEngine(from_args(EngineConfig, a)) as engine:
        t_ready = time.monotonic()
        try:
            ids = encode_prompt(engine.tokenizer, a.prompt, a.prompt_ids, a.chat)
            seq = engine.add_request(ids, _raw_params(a))
        except ValueError as e:
            print(f"pdserve generate: INVALID_ARGUMENT: {e}", file=sys.stderr)
            return 2
        while not seq.is_finished:
            for out in engine.step():
                if not a.json and out.text_delta:
                    print(out.text_delta, end="", flush=True)
        result = engine.completion(seq)
    if a.json:
        timings = dict(result.timings, load_s=t_ready - t_start)
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "prompt_token_ids": result.prompt_token_ids,
                          "finish_reason": result.finish_reason, "timings": timings}))
    else:
        print()
        t = result.timings
        print(f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, ttft={t['ttft_s'] * 1e3:.0f} ms"
              + (f", tpot={t['tpot_s'] * 1e3:.1f} ms" if t["tpot_s"] else "") + "]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description="disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text (offline: runs the engine in this process)")
    g.add_argument("prompt", nargs="?", default=None)
    g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_flags(g.add_argument_group("engine"), EngineConfig)
    add_sampling_flags(g)
    g.add_argument("--coordinator", default=None, help="send to a running cluster instead of running offline")
    g.add_argument("--served-model", default=None, help="model name to ask the coordinator for")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds (with --coordinator)")
    add_flags(g.add_argument_group("TLS and API key (with --coordinator)"), ClientConfig)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("coordinator", help="run the coordinator")
    add_flags(c, CoordinatorConfig)
    add_flags(c.add_argument_group("security"), SecurityConfig)
    add_switch_interval_flag(c)
    # set by a --workers N coordinator on the worker processes it starts (coordinator/supervisor.py)
    c.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)
    c.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    c.add_argument("--subscriber", default="", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_coordinator)

    for role in ("prefill", "decode", "node"):
        n = sub.add_parser(role, help=f"run a {role} node" if role != "node" else "run a node of --role ROLE")
        if role == "node":
            n.add_argument("--role", required=True, choices=["prefill", "decode", "both"],
                           help="both: a colocated node (prefill and decode in one continuous batch)")
        add_flags(n.add_argument_group("node"), NodeConfig)
        add_flags(n.add_argument_group("security"), SecurityConfig)
        add_kv_flags(n)
        add_switch_interval_flag(n, node=True)
        add_flags(n.add_argument_group("engine"), EngineConfig)
        if role != "node":
            n.set_defaults(role=role)
        n.set_defaults(func=cmd_node)

    u = sub.add_parser("up", help="start a local cluster: coordinator + prefill and decode pools")
    add_flags(u, ClusterConfig)
    add_flags(u.add_argument_group("security (every member's)"), SecurityConfig)
    u.set_defaults(func=cmd_up)

    b = sub.add_parser("bench", help="serving benchmark with goodput against a running coordinator")
    from pdserve.bench import add_flags as add_bench_flags
    add_bench_flags(b)
    b.set_defaults(func=cmd_bench)

    st = sub.add_parser("status", help="nodes, roles, load and KV blocks of a cluster")
    st.add_argument("--coordinator", required=True)
    st.add_argument("--json", action="store_true")
    add_flags(st.add_argument_group("TLS and API key"), ClientConfig)
    st.set_defaults(func=cmd_status)

    h = sub.add_parser("health", help="exit 0 if a coordinator or node answers SERVING to the standard gRPC "
                                      "health check (a readiness probe that speaks TLS)")
    h.add_argument("--address", required=True)
    h.add_argument("--timeout", type=float, default=2.0)
    add_flags(h.add_argument_group("TLS"), ClientConfig)
    h.set_defaults(func=cmd_health)

    ce = sub.add_parser("certs", help="make a test CA, a cluster member certificate, a client certificate, a "
                                      "cluster secret and an API key (first deployments and tests)")
    from pdserve.certs import add_flags as add_certs_flags
    add_certs_flags(ce)
    ce.set_defaults(func=cmd_certs)
    return ap


SWITCH_INTERVAL_US = 200.0
COLOCATED_SWITCH_INTERVAL_US = 2000.0


def add_switch_interval_flag(p: argparse.ArgumentParser, node: bool = False) -> None:
    why = ("Python's thread switch interval, microseconds (Python's default: 5000): the longest a thread that woke "
           "up (gRPC, the KV I/O thread) waits for the GIL while another runs Python, as the engine thread does for "
           "the whole time it queues a step")
    if node:
        why += (f" (default {SWITCH_INTERVAL_US:g}; {COLOCATED_SWITCH_INTERVAL_US:g} on a colocated node, which moves "
                "no KV: fewer switches away from its engine thread)")
    p.add_argument("--switch-interval-us", type=float, default=None if node else SWITCH_INTERVAL_US, help=why)


def set_switch_interval(a: argparse.Namespace) -> None:
    """A serving process's threads hand work to each other (a request to the engine thread,
    a KV control message to the I/O thread): at Python's 5 ms, a message queued as a
    prefill step starts can wait up to 5 ms for the engine thread to let go of the GIL.
    A colocated node has no KV messages, and each switch away from its engine thread
    lengthens a decode step: it switches less often."""
    us = a.switch_interval_us
    if us is None:
        us = COLOCATED_SWITCH_INTERVAL_US if getattr(a, "role", "") == "both" else SWITCH_INTERVAL_US
    if us <= 0:
        raise SystemExit("--switch-interval-us must be > 0")
    sys.setswitchinterval(us * 1e-6)


def cmd_coordinator(a: argparse.Namespace) -> int:
    import asyncio
    set_switch_interval(a)
    # the coordinator runs without torch: transformers then loads tokenizers only
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
    import logging
    from pdserve.process import run_until_signal
    cfg = from_args(CoordinatorConfig, a, security=from_args(SecurityConfig, a))
    if a.worker_of:
        from pdserve.coordinator.worker import Worker
        logging.basicConfig(level=logging.INFO,
                            format=f"%(asctime)s %(name)s[worker {a.worker_index}] %(levelname)s %(message)s")
        token = sys.stdin.readline().strip()  # the supervisor's link token
        return asyncio.run(run_until_signal(Worker(cfg, a.worker_of, a.worker_index, a.subscriber, token)))
    workers = cfg.worker_count()
    if workers > 1:
        from pdserve.coordinator.supervisor import Supervisor
        return asyncio.run(run_until_signal(Supervisor(cfg, workers)))
    from pdserve.coordinator.server import Coordinator
    return asyncio.run(run_until_signal(Coordinator(cfg)))


def cmd_node(a: argparse.Namespace) -> int:
    import asyncio
    import os
    set_switch_interval(a)
    # auto stays in the node's config: the node resolves it the same way and says what it picked
    transport = registry.resolve(a.kv_transport, a.device, a.role, a.coordinator)
    if transport == "nccl":
        # CUDA loads a kernel lazily by default, and loading one waits for the kernels
        # running on the device, a NCCL receive spinning on a dead peer included: the
        # engine thread would then hang before it could abort that pair. Load them all
        # when CUDA starts instead (a few seconds and some GPU memory per process); the TP
        # rank processes inherit it.
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        if a.kv_host in (None, "127.0.0.1", "localhost"):  # NCCL's and gloo's own sockets stay on loopback too
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from pdserve.process import run_until_signal
    cfg = from_args(NodeConfig, a, kv=kv_config(a, transport), engine=from_args(EngineConfig, a),
                    security=from_args(SecurityConfig, a))
    if a.role == "prefill":
        from pdserve.prefill_node.server import PrefillNode as Node
    elif a.role == "both":
        from pdserve.colocated_node.server import ColocatedNode as Node
    else:
        from pdserve.decode_node.server import DecodeNode as Node
    return asyncio.run(run_until_signal(Node(cfg)))


def cmd_up(a: argparse.Namespace) -> int:
    from pdserve.cluster import Cluster
    cfg = from_args(ClusterConfig, a, security=from_args(SecurityConfig, a))
    if cfg.colocated:
        cfg.prefill = cfg.decode = 0
    return Cluster(cfg).run()


def cmd_bench(a: argparse.Namespace) -> int:
    from pdserve.bench import main as bench
    return bench(a)


def cmd_status(a: argparse.Namespace) -> int:
    from pdserve.client import status
    import grpc
    try:
        s = status(a.coordinator, creds=client_credentials(a))
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(s))
        return 0
    print(f"model: {s['model'] or 'default'}")
    for n in s["nodes"]:
        print(f"{n['role']:8} {n['id']}  {n['address']:22} {'healthy' if n['healthy'] else 'DOWN':8} tp={n['tp']} "
              f"kv={n['kv_blocks_free']}/{n['kv_blocks_total']} running={n['running']} queued={n['queued']}"
              + (f" transport={n['kv_transport']}" if n["kv_transport"] else ""))
    for w in s["workers"]:
        print(f"worker {w['index']}  pid {w['pid']:<8} {'ready' if w['ready'] else 'STARTING':8} "
              f"served={w['served']} inflight={w['inflight']} restarts={w['restarts']}")
    return 0


def client_credentials(a: argparse.Namespace):
    from pdserve.wire.security import Credentials
    return Credentials.client(from_args(ClientConfig, a))


def cmd_health(a: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    creds = client_credentials(a)
    try:
        with creds.sync_channel(a.address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=a.timeout)
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_certs(a: argparse.Namespace) -> int:
    from pdserve.certs import main as certs
    return certs(a)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"pdserve: {e}", file=sys.stderr)
        sys.exit(2)
