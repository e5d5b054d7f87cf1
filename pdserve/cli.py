"""`pdserve` command line. Each subcommand builds its component's config from flags."""
from __future__ import annotations

import argparse
import json
import sys
import time

from pdserve.common.model_files import DEFAULT_MODEL


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help=f"checkpoint folder or .gguf file (default: {DEFAULT_MODEL})")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-blocks", type=int, default=None, help="KV pool size in blocks")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    g.add_argument("--no-prefill-graphs", action="store_true",
                   help="GPU: steps with prompt tokens run eagerly (decode-only steps still replay graphs)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from config.json alone (benchmarks)")


def engine_config(a: argparse.Namespace):
    from pdserve.engine.config import EngineConfig  # torch: only the roles that run the engine import it
    return EngineConfig(model=a.model, tp=a.tp, device=a.device, dtype=a.dtype, block_size=a.block_size,
                        kv_blocks=a.kv_blocks, gpu_memory_utilization=a.gpu_memory_utilization,
                        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                        max_model_len=a.max_model_len, chunked_prefill=not a.no_chunked_prefill,
                        enforce_eager=a.enforce_eager, prefill_graphs=not a.no_prefill_graphs,
                        load_format=a.load_format)


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
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer.encode(prompt)


def cmd_generate(a: argparse.Namespace) -> int:
    if a.prompt is None and not a.prompt_ids:
        print("pdserve generate: give a prompt or --prompt-ids", file=sys.stderr)
        return 2
    if a.coordinator:
        from pdserve.client import build_request, generate
        req = build_request(a.prompt, _ids(a.prompt_ids) if a.prompt_ids else None, a.chat, _raw_params(a),
                            model=a.served_model or "")
        return generate(a.coordinator, req, a.json, a.timeout)
    from pdserve.engine.llm_engine import LLMEngine
    t_start = time.monotonic()
    with LLMEngine(engine_config(a)) as engine:
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
    add_engine_flags(g)
    add_sampling_flags(g)
    g.add_argument("--coordinator", default=None, help="send to a running cluster instead of running offline")
    g.add_argument("--served-model", default=None, help="model name to ask the coordinator for")
    g.add_argument("--timeout", type=float, default=None, help="deadline in seconds (with --coordinator)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("coordinator", help="run the coordinator")
    c.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (binds 127.0.0.1 unless told otherwise)")
    c.add_argument("--model", default=None,
                   help="the served model: only nodes of its checkpoint may register (default: agreed with the "
                        "live nodes; while none is live, the next to register sets it)")
    # None: CoordinatorConfig's default (one place for each default)
    c.add_argument("--heartbeat-interval", dest="heartbeat_interval_s", type=float, default=None,
                   help="seconds between node heartbeats; a node missing 3 is fenced off (default 0.5)")
    c.add_argument("--max-inflight", type=int, default=None, help="requests served at once (default 256)")
    c.add_argument("--max-queued", type=int, default=None,
                   help="requests waiting for a slot or for decode blocks beyond those; more get "
                        "RESOURCE_EXHAUSTED (default 1024)")
    c.add_argument("--lease", dest="lease_s", type=float, default=None,
                   help="seconds a decode reservation lives unless renewed; the coordinator renews it while "
                        "its request waits (default 30)")
    c.add_argument("--max-migrations", type=int, default=None,
                   help="times a request may move to another decode node when its decode node dies (default 2)")
    c.add_argument("--max-retries", type=int, default=None,
                   help="failed prefill attempts (a node lost, a transfer failed) before UNAVAILABLE (default 3)")
    c.add_argument("--max-request-bytes", type=int, default=None,
                   help="larger client messages get RESOURCE_EXHAUSTED before any work (default 4 MiB)")
    c.add_argument("--client-stall-timeout", dest="client_stall_s", type=float, default=None,
                   help="seconds a client may leave its stream unread before it is ended (default 30)")
    c.add_argument("--node-expiry", dest="node_expiry_s", type=float, default=None,
                   help="seconds after which a silent node leaves the registry and `status` (default 30)")
    add_switch_interval_flag(c)
    c.set_defaults(func=cmd_coordinator)

    for role in ("prefill", "decode", "node"):
        n = sub.add_parser(role, help=f"run a {role} node" if role != "node" else "run a node of --role ROLE")
        if role == "node":
            n.add_argument("--role", required=True, choices=["prefill", "decode", "both"],
                           help="both: a colocated node (prefill and decode in one continuous batch)")
        n.add_argument("--coordinator", required=True)
        n.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT of this node's gRPC server")
        n.add_argument("--kv-transport", default="zmq", choices=["zmq", "nccl"],
                       help="KV data plane: zmq (any hosts, the default) or nccl (GPU to GPU; gloo on CPU)")
        # the KV backend's options (kv_transfer/<name>/config.py holds their defaults)
        n.add_argument("--kv-timeout", dest="kv_timeout_s", type=float, default=None,
                       help="nccl: seconds a transfer may take before its pair is aborted and rebuilt (default 30)")
        n.add_argument("--kv-min-message-mib", type=float, default=None,
                       help="nccl: layers go in messages of at least this many MiB (fewer, larger messages "
                            "against a shorter tail after the last layer; default 16)")
        n.add_argument("--kv-max-ctas", type=int, default=None,
                       help="nccl: most SMs each KV pair's NCCL kernels may take (default 0: NCCL's choice)")
        n.add_argument("--kv-host", default=None, help="decode: address the KV receiver binds (default 127.0.0.1)")
        n.add_argument("--kv-ipc", default=None, help="zmq, decode: bind the KV receiver to this ipc path instead")
        n.add_argument("--kv-layers-per-message", type=int, default=None, help="zmq, prefill (default 1)")
        n.add_argument("--max-unread-batches", type=int, default=None,
                       help="decode: a token stream (Subscribe) this many step batches behind is ended (default 4096)")
        add_switch_interval_flag(n)
        add_engine_flags(n)
        if role != "node":
            n.set_defaults(role=role)
        n.set_defaults(func=cmd_node)

    u = sub.add_parser("up", help="start a local cluster: coordinator + prefill and decode pools")
    u.add_argument("--prefill", type=int, default=1)
    u.add_argument("--decode", type=int, default=1)
    u.add_argument("--prefill-tp", type=int, default=1)
    u.add_argument("--decode-tp", type=int, default=1)
    u.add_argument("--colocated", type=int, default=0,
                   help="N colocated nodes (--role both, TP --decode-tp) instead of the two pools")
    u.add_argument("--model", default=None)
    u.add_argument("--device", default="auto", help="auto, cpu or cuda")
    u.add_argument("--listen", default="127.0.0.1:50051")
    u.add_argument("--kv-blocks", type=int, default=None)
    u.add_argument("--max-num-seqs", type=int, default=64)
    u.add_argument("--max-num-batched-tokens", type=int, default=2048)
    u.add_argument("--kv-transport", default="zmq", choices=["zmq", "nccl"])
    u.set_defaults(func=cmd_up)

    b = sub.add_parser("bench", help="serving benchmark with goodput against a running coordinator")
    from pdserve.bench import add_flags
    add_flags(b)
    b.set_defaults(func=cmd_bench)

    st = sub.add_parser("status", help="nodes, roles, load and KV blocks of a cluster")
    st.add_argument("--coordinator", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    return ap


SWITCH_INTERVAL_US = 200.0


def add_switch_interval_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--switch-interval-us", type=float, default=SWITCH_INTERVAL_US,
                   help="Python's thread switch interval, microseconds (Python's default: 5000): the longest a "
                        "thread that woke up (gRPC, the KV I/O thread) waits for the GIL while another runs "
                        "Python, as the engine thread does for the whole time it queues a step")


def set_switch_interval(a: argparse.Namespace) -> None:
    """A serving process's threads hand work to each other (a request to the engine thread,
    a KV control message to the I/O thread): at Python's 5 ms, a message queued as a
    prefill step starts can wait up to 5 ms for the engine thread to let go of the GIL."""
    if a.switch_interval_us <= 0:
        raise SystemExit("--switch-interval-us must be > 0")
    sys.setswitchinterval(a.switch_interval_us * 1e-6)


def cmd_coordinator(a: argparse.Namespace) -> int:
    import asyncio
    set_switch_interval(a)
    # the coordinator runs without torch: transformers then loads tokenizers only
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
    from pdserve.coordinator.server import Coordinator, CoordinatorConfig
    from pdserve.process import run_until_signal
    given = {k: getattr(a, k) for k in ("heartbeat_interval_s", "max_inflight", "max_queued", "lease_s",
                                        "max_migrations", "max_retries", "max_request_bytes", "client_stall_s",
                                        "node_expiry_s") if getattr(a, k) is not None}
    cfg = CoordinatorConfig(listen=a.listen, model=a.model, **given)
    return asyncio.run(run_until_signal(Coordinator(cfg)))


def cmd_node(a: argparse.Namespace) -> int:
    import asyncio
    import os
    set_switch_interval(a)
    if a.kv_transport == "nccl":
        # CUDA loads a kernel lazily by default, and loading one waits for the kernels
        # running on the device, a NCCL receive spinning on a dead peer included: the
        # engine thread would then hang before it could abort that pair. Load them all
        # when CUDA starts instead (about 2 s and 640 MiB per process on an H200); the TP
        # rank processes inherit it.
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
        if a.kv_host in (None, "127.0.0.1", "localhost"):  # NCCL's and gloo's own sockets stay on loopback too
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from pdserve.kv_transfer.registry import make_config
    from pdserve.node.config import NodeConfig
    from pdserve.process import run_until_signal
    kv = make_config(a.kv_transport, host=a.kv_host, ipc=a.kv_ipc, layers_per_message=a.kv_layers_per_message,
                     timeout_s=a.kv_timeout_s, min_message_mib=a.kv_min_message_mib, max_ctas=a.kv_max_ctas)
    cfg = NodeConfig(coordinator=a.coordinator, listen=a.listen, kv_transport=a.kv_transport, kv=kv,
                     engine=engine_config(a),
                     **({"max_unread_batches": a.max_unread_batches} if a.max_unread_batches else {}))
    if a.role == "prefill":
        from pdserve.prefill_node.server import PrefillNode as Node
    elif a.role == "both":
        from pdserve.colocated_node.server import ColocatedNode as Node
    else:
        from pdserve.decode_node.server import DecodeNode as Node
    return asyncio.run(run_until_signal(Node(cfg)))


def cmd_up(a: argparse.Namespace) -> int:
    from pdserve.cluster import Cluster, ClusterConfig
    cfg = ClusterConfig(prefill=0 if a.colocated else a.prefill, decode=0 if a.colocated else a.decode,
                        colocated=a.colocated, prefill_tp=a.prefill_tp, decode_tp=a.decode_tp,
                        model=a.model, device=a.device, listen=a.listen, kv_blocks=a.kv_blocks,
                        max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                        kv_transport=a.kv_transport)
    return Cluster(cfg).run()


def cmd_bench(a: argparse.Namespace) -> int:
    from pdserve.bench import main as bench
    return bench(a)


def cmd_status(a: argparse.Namespace) -> int:
    from pdserve.client import status
    import grpc
    try:
        s = status(a.coordinator)
    except grpc.RpcError as e:
        print(f"{e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(s))
        return 0
    print(f"model: {s['model'] or 'default'}")
    for n in s["nodes"]:
        print(f"{n['role']:8} {n['id']}  {n['address']:22} {'healthy' if n['healthy'] else 'DOWN':8} tp={n['tp']} "
              f"kv={n['kv_blocks_free']}/{n['kv_blocks_total']} running={n['running']} queued={n['queued']}")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve: {e}", file=sys.stderr)
        sys.exit(2)
