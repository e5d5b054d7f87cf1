"""The HTTP API on `pdserve coordinator --workers 2`: both frontend processes serve the
one HTTP port; readiness follows what routing can serve (no node, a 1P1D pool, the
decode node gone); the API key guards the OpenAI routes; `pdserve bench --backend
openai` writes the result fields of the gRPC backend."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import pytest

from pdserve.cluster import Cluster, ClusterConfig
from pdserve.common.config import ClientConfig
from pdserve.wire.security import Credentials
from tests.cluster_util import Client, greedy, request
from tests.fault_util import pids_by_role, wait_until, write_tiny_chat_model
from tests.http_util import assert_error, iter_sse, openai_client, start_http_cluster

KEY = "test-key"
FILE_KEY = "key-from-the-file"  # --api-key-file: accepted beside --api-key on both APIs
CONTEXT = 4096  # a long stream is still running when the test kills its decode node


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smol_dir):
    return write_tiny_chat_model(tmp_path_factory.mktemp("chat"), smol_dir, max_positions=CONTEXT)


@pytest.fixture(scope="module")
def coordinator(chat_model, tmp_path_factory):
    """A 2-worker coordinator with the HTTP API and API keys (--api-key, --api-key-file), no node yet."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# clients\n{FILE_KEY}\n")
    c = start_http_cluster(chat_model, prefill=0, decode=0, workers=2, api_key=KEY,
                           coordinator_flags=("--api-key-file", str(keys)))
    c.grpc = Client(c.cfg.listen, creds=Credentials.client(ClientConfig(api_key=KEY)))
    wait_until(lambda: all(w["ready"] for w in c.grpc.status()["workers"]), 60, "both workers")
    yield c
    c.grpc.close()
    c.stop()


def fresh(base: str, path: str, **kw) -> httpx.Response:
    """A GET on a connection of its own (the kernel may give it to either worker)."""
    with httpx.Client(timeout=30) as client:
        return client.get(base + path, **kw)


def test_without_nodes_the_api_is_alive_but_not_ready_and_says_503(coordinator, chat_model):
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(4):
        assert fresh(coordinator.http, "/health").status_code == 200
        r = fresh(coordinator.http, "/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
    r = httpx.post(coordinator.http + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, headers=auth)
    assert_error(r, 503)


def test_the_api_key_guards_the_openai_routes_only(coordinator):
    import openai
    assert_error(fresh(coordinator.http, "/v1/models"), 401)
    assert_error(fresh(coordinator.http, "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    r = httpx.post(coordinator.http + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert_error(r, 401)
    for key in (KEY, FILE_KEY):  # the keys gRPC accepts, from the one config (api_key, api_key_file)
        assert fresh(coordinator.http, "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert fresh(coordinator.http, "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai_client(coordinator.http, api_key="wrong").models.list()


def test_the_same_api_keys_guard_grpc(coordinator):
    for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED),
                      (FILE_KEY, None), (KEY, None)):
        client = Client(coordinator.cfg.listen, creds=Credentials.client(ClientConfig(api_key=key)))
        try:
            if code is None:
                assert client.status()["nodes"] == []  # served: no node has joined yet
            else:
                with pytest.raises(grpc.RpcError) as e:
                    client.status()
                assert e.value.code() == code, e.value
        finally:
            client.close()


@pytest.fixture(scope="module")
def pools(coordinator, chat_model):
    """1 prefill + 1 decode node joining the coordinator."""
    p = Cluster(ClusterConfig(prefill=1, decode=1, model=chat_model, device="cpu", listen=coordinator.cfg.listen,
                              coordinator=False, kv_blocks=CONTEXT // 16 + 64, api_key=KEY))  # polls with it
    try:
        p.start()
    except BaseException:
        p.stop()
        raise
    yield p
    p.stop()


def test_with_a_pool_both_workers_are_ready_and_serve_the_grpc_tokens(coordinator, pools, chat_model):
    wait_until(lambda: all(fresh(coordinator.http, "/ready").status_code == 200 for _ in range(6)), 30,
               "every worker to be ready")
    prompts = [f"Question {i}: what comes after {i}?" for i in range(12)]
    expected = [coordinator.grpc.generate(request(p, greedy(8, ignore_eos=True)))["token_ids"] for p in prompts]
    got = [None] * len(prompts)

    def one(i):
        with httpx.Client(timeout=120) as http:  # a connection of its own: either worker may take it
            client = openai_client(coordinator.http, api_key=KEY, http_client=http)
            r = client.completions.create(model=chat_model, prompt=prompts[i], max_tokens=8, temperature=0,
                                          stream=i % 2 == 1, extra_body={"ignore_eos": True, "return_token_ids": True})
            got[i] = r.choices[0].token_ids if i % 2 == 0 else [t for c in r for t in c.choices[0].token_ids]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    # the gRPC requests above shared one connection (one worker); the HTTP ones had one each
    wait_until(lambda: sum(w["served"] for w in coordinator.grpc.status()["workers"]) >= 2 * len(prompts) + 1, 10,
               "the workers to report what they served")
    assert all(w["served"] > 0 for w in coordinator.grpc.status()["workers"])
    coordinator.grpc.wait_blocks_at_baseline()


def bench(target: list[str], tmp_path, name: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "pdserve", "bench", *target, "--save-result", "--result-dir",
                        str(tmp_path), "--result-filename", name, "--disable-tqdm", "--num-prompts", "8",
                        "--request-rate", "20", "--random-input-len", "24", "--random-output-len", "6",
                        "--goodput", "ttft:60000", "tpot:60000"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OPENAI_API_KEY": KEY})
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((tmp_path / name).read_text())


def test_bench_with_the_openai_backend_writes_the_fields_of_the_grpc_backend(coordinator, pools, tmp_path):
    grpc_run = bench(["--coordinator", coordinator.cfg.listen, "--api-key", KEY], tmp_path, "grpc.json")
    http_run = bench(["--backend", "openai", "--base-url", coordinator.http + "/v1"], tmp_path, "http.json")
    assert set(http_run) == set(grpc_run)
    assert http_run["backend"] == "openai" and http_run["model_id"] == grpc_run["model_id"]
    assert http_run["completed"] == 8 and http_run["failed"] == 0 and http_run["errors"] == [""] * 8
    assert http_run["output_lens"] == [6] * 8 and http_run["input_lens"] == grpc_run["input_lens"]
    assert http_run["total_input_tokens"] == grpc_run["total_input_tokens"]
    # one ITL per chunk with tokens (bench_result's rule); requests sent on the absolute schedule
    assert all(0 < len(itl) <= out - 1 for itl, out in zip(http_run["itls"], http_run["output_lens"]))
    assert len(http_run["arrival_times"]) == 8 and http_run["arrival_times"] == sorted(http_run["arrival_times"])
    assert http_run["slo_attainment"] == 1.0


def test_a_decode_node_lost_mid_stream_ends_the_stream_with_an_error_event_and_no_worker_is_ready(
        coordinator, pools):
    body = {"prompt": [1, 2, 3], "max_tokens": CONTEXT - 10, "ignore_eos": True, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", coordinator.http + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        for event in iter_sse(r.iter_lines()):
            if not events:  # the first token is out: the decode node dies mid-stream
                os.kill(pids_by_role(pools)["decode"][0], signal.SIGKILL)
            events.append(event)
    assert len(events) < CONTEXT // 2 and events[-1] == "[DONE]" and "error" in events[-2], events[-2:]
    error = events[-2]["error"]
    assert error["type"] == "server_error" and error["code"] == "unavailable", error
    wait_until(lambda: all(fresh(coordinator.http, "/ready").status_code == 503 for _ in range(6)), 30,
               "every worker to see the decode node gone")
    assert fresh(coordinator.http, "/health").status_code == 200
