"""`pdserve generate` is a contract: flags in, one JSON object (or streamed text) out."""
from __future__ import annotations

import pytest
import json
import subprocess
import sys

from tests.conftest import assert_matches_reference


def pdserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_json_with_prompt_ids_matches_the_reference(tiny_models, reference):
    path = tiny_models["qwen3"]
    r = pdserve("generate", "--model", path, "--prompt-ids", "3,14,15,92,65", "--max-tokens", "9",
                "--ignore-eos", "--kv-blocks", "32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings"}
    assert out["prompt_token_ids"] == [3, 14, 15, 92, 65]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 9
    assert out["text"] is None  # a weights-only checkpoint has no tokenizer
    assert out["timings"]["ttft_s"] > 0 and out["timings"]["tpot_s"] > 0
    assert_matches_reference(out["token_ids"], reference(path).generate([3, 14, 15, 92, 65], 9), "cli")


def test_generate_chat_streams_text_and_json_agrees(smol_dir):
    args = ("generate", "--model", smol_dir, "--chat", "--max-tokens", "24", "--kv-blocks", "64",
            "What is the capital of France?")
    streamed = pdserve(*args)
    as_json = pdserve(*args, "--json")
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    out = json.loads(as_json.stdout)
    assert "Paris" in out["text"] and out["finish_reason"] == "stop"
    assert streamed.stdout.rstrip("\n") == out["text"]
    assert out["token_ids"][-1] == 2  # <|im_end|> ends the answer and is reported


def test_generate_stop_string_and_sampling_flags(smol_dir):
    base = ("generate", "--model", smol_dir, "--chat", "--max-tokens", "24", "--kv-blocks", "64", "--json",
            "What is the capital of France?")
    cut = json.loads(pdserve(*base, "--stop", "Paris").stdout)
    assert cut["finish_reason"] == "stop" and cut["text"] == "The capital of France is "
    a = json.loads(pdserve(*base, "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "7").stdout)
    b = json.loads(pdserve(*base, "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "7").stdout)
    assert a["token_ids"] == b["token_ids"]


def test_bad_input_exits_nonzero_with_a_reason(tiny_models):
    r = pdserve("generate", "--model", tiny_models["llama"], "--prompt-ids", "1,2,99999", "--json")
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr and "out of range" in r.stderr
    r = pdserve("generate", "--model", tiny_models["llama"], "--prompt-ids", "1,2", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr
    r = pdserve("generate", "--model", tiny_models["qwen2"], "--tp", "3", "--prompt-ids", "1")
    assert r.returncode == 2 and "does not divide" in r.stderr


def test_configs_round_trip_through_their_flags():
    """A config rendered to flags (as the launcher does) and parsed back (as the role does) is the same config."""
    from pdserve.cli import build_parser
    from pdserve.cluster import Cluster, ClusterConfig
    from pdserve.common.config import CoordinatorConfig, EngineConfig, NodeConfig
    from pdserve.common.flags import from_args, to_argv
    from pdserve.cli import kv_config
    from pdserve.kv_transfer.nccl.config import NcclConfig
    engine = EngineConfig(tp=2, kv_blocks=77, chunked_prefill=False, prefill_graphs=False, dtype="float16")
    kv = NcclConfig(timeout_s=5.0, host="127.0.0.2")
    node = NodeConfig(coordinator="127.0.0.1:9", kv_transport="nccl", kv=kv, max_unread_batches=7, engine=engine,
                      metrics_listen="127.0.0.1:9100")
    a = build_parser().parse_args(["node", "--role", "decode", *to_argv(node), *to_argv(engine),
                                   *to_argv(kv, prefix="kv_")])
    assert from_args(NodeConfig, a, kv=kv_config(a), engine=from_args(EngineConfig, a)) == node
    with pytest.raises(ValueError, match="no option layers_per_message"):  # a zmq option given to nccl
        kv_config(build_parser().parse_args(["node", "--role", "prefill", "--coordinator", "x",
                                             "--kv-transport", "nccl", "--kv-layers-per-message", "2"]))
    coordinator = CoordinatorConfig(listen="127.0.0.1:7", lease_s=3.0, client_stall_s=2.0, max_queued=5,
                                    metrics_listen="127.0.0.1:9101")
    a = build_parser().parse_args(["coordinator", *to_argv(coordinator)])
    assert from_args(CoordinatorConfig, a) == coordinator
    assert to_argv(EngineConfig()) == [] and to_argv(CoordinatorConfig()) == []
    cmds = Cluster(ClusterConfig(prefill=1, decode=1, device="cpu", max_num_seqs=9, kv_transport="nccl",
                                 kv_max_ctas=4)).node_commands()
    for cmd in cmds:
        a = build_parser().parse_args(cmd[3:])
        assert (a.max_num_seqs, a.kv_transport, a.kv_max_ctas) == (9, "nccl", 4)
