"""The OpenAI-compatible HTTP API (`pdserve coordinator --http-listen`), driven by the
official openai client against a real 1P1D cluster on CPU (a tiny random model with the
default model's tokenizer): the same tokens as the gRPC path and transformers, usage,
stop strings and finish reasons, streaming, and every bad input as an OpenAI error with
its HTTP status, while a good request beside them is undisturbed."""
from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from tests.cluster_util import Client, greedy, request
from tests.conftest import assert_matches_reference
from tests.fault_util import wait_until, write_tiny_chat_model
from tests.http_util import assert_error, openai_client, post, sse, start_http_cluster
from tests.metrics_util import scrape

PROMPT = "The quick brown fox jumps over the lazy dog because"
GREEDY = {"temperature": 0}
CONTEXT = 8192  # long enough that a request left running would outlast wait_blocks_at_baseline


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smol_dir):
    return write_tiny_chat_model(tmp_path_factory.mktemp("chat"), smol_dir, max_positions=CONTEXT)


@pytest.fixture(scope="module")
def cluster(chat_model):
    # the coordinator's own guards against clients that stop reading would free a request
    # that a disconnect failed to cancel: out of the way here, so the disconnect tests can fail
    c = start_http_cluster(chat_model, kv_blocks=CONTEXT // 16 + 64,
                           coordinator_flags=("--max-pending-tokens", str(4 * CONTEXT),
                                              "--client-stall-timeout", "300"))
    c.grpc = Client(c.cfg.listen)
    c.oai = openai_client(c.http)
    yield c
    c.grpc.close()
    c.stop()


def extra(**kw) -> dict:
    return {"extra_body": {"return_token_ids": True, **kw}}


def test_completions_give_the_tokens_of_the_grpc_path_and_transformers(cluster, chat_model, reference):
    grpc_out = cluster.grpc.generate(request(PROMPT, greedy(12, ignore_eos=True)))
    r = cluster.oai.completions.create(model=chat_model, prompt=PROMPT, max_tokens=12, **GREEDY,
                                       **extra(ignore_eos=True))
    choice = r.choices[0]
    assert choice.token_ids == grpc_out["token_ids"] and choice.text == grpc_out["text"]
    assert choice.finish_reason == "length" and r.object == "text_completion" and r.model == chat_model
    assert_matches_reference(choice.token_ids, reference(chat_model).generate(choice.prompt_token_ids, 12), "http")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(choice.prompt_token_ids), 12, len(choice.prompt_token_ids) + 12)
    # a prompt of token ids gives the same
    ids = cluster.oai.completions.create(model=chat_model, prompt=choice.prompt_token_ids, max_tokens=12, **GREEDY,
                                         **extra(ignore_eos=True))
    assert ids.choices[0].token_ids == choice.token_ids and ids.usage.prompt_tokens == r.usage.prompt_tokens
    cluster.grpc.wait_blocks_at_baseline()


def test_streamed_completions_equal_the_whole_answer_with_usage_last(cluster, chat_model):
    whole = cluster.oai.completions.create(model=chat_model, prompt=PROMPT, max_tokens=10, **GREEDY,
                                           **extra(ignore_eos=True))
    chunks = list(cluster.oai.completions.create(model=chat_model, prompt=PROMPT, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY,
                                                 **extra(ignore_eos=True)))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    body = chunks[:-1]
    assert all(c.usage is None for c in body) and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert [t for c in body for t in c.choices[0].token_ids] == whole.choices[0].token_ids
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])


def test_chat_streamed_and_not_gives_the_tokens_of_a_grpc_chat(cluster, chat_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    grpc_req = request("x", greedy(8, ignore_eos=True))
    grpc_req.chat.messages.add(role="system", content="Be brief.")
    grpc_req.chat.messages.add(role="user", content="Name a colour.")
    grpc_out = cluster.grpc.generate(grpc_req)
    r = cluster.oai.chat.completions.create(model=chat_model, messages=messages, max_tokens=8, **GREEDY,
                                            **extra(ignore_eos=True))
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == grpc_out["text"] and r.choices[0].token_ids == grpc_out["token_ids"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    chunks = list(cluster.oai.chat.completions.create(model=chat_model, messages=messages, max_completion_tokens=8,
                                                      stream=True, **GREEDY, **extra(ignore_eos=True)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == grpc_out["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    # no max_tokens: a chat may run to the end of the context (here it stops at a stop token)
    ids = grpc_out["token_ids"]
    open_ended = cluster.oai.chat.completions.create(model=chat_model, messages=messages, **GREEDY,
                                                     **extra(stop_token_ids=[ids[-1]]))
    assert open_ended.choices[0].finish_reason == "stop"
    assert open_ended.choices[0].token_ids == ids[:ids.index(ids[-1]) + 1]
    cluster.grpc.wait_blocks_at_baseline()


def test_a_stop_string_cuts_the_text_before_it_with_finish_reason_stop(cluster, chat_model):
    full = cluster.oai.completions.create(model=chat_model, prompt=PROMPT, max_tokens=24, **GREEDY,
                                          **extra(ignore_eos=True)).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick another prompt: {full!r}"
    for stream in (False, True):
        r = cluster.oai.completions.create(model=chat_model, prompt=PROMPT, max_tokens=24, stop=[stop], stream=stream,
                                           **GREEDY, **extra(ignore_eos=True))
        if stream:
            chunks = list(r)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == full[:full.index(stop)] and finish == "stop", (stream, stop, text, full)


def test_n_choices_and_prompt_lists_are_indexed_prompt_major(cluster, chat_model):
    r = cluster.oai.completions.create(model=chat_model, prompt=[PROMPT, "Hello"], n=2, max_tokens=5, **GREEDY,
                                       **extra(ignore_eos=True))
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].token_ids == r.choices[1].token_ids != r.choices[2].token_ids == r.choices[3].token_ids
    assert r.usage.prompt_tokens == len(r.choices[0].prompt_token_ids) + len(r.choices[2].prompt_token_ids)
    assert r.usage.completion_tokens == 20
    seeded = cluster.oai.completions.create(model=chat_model, prompt=PROMPT, n=3, max_tokens=6, seed=7,
                                            temperature=1.0, **extra())
    again = cluster.oai.completions.create(model=chat_model, prompt=PROMPT, n=3, max_tokens=6, seed=7,
                                           temperature=1.0, **extra())
    assert [c.token_ids for c in seeded.choices] == [c.token_ids for c in again.choices]
    chunks = list(cluster.oai.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": "hi"}],
                                                      n=2, max_tokens=4, stream=True, **GREEDY))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sum(c.choices[0].finish_reason == "length" for c in chunks) == 2
    cluster.grpc.wait_blocks_at_baseline()


def test_models_health_readiness_and_metrics(cluster, chat_model):
    assert [m.id for m in cluster.oai.models.list().data] == [chat_model]
    assert httpx.get(cluster.http + "/health").status_code == 200
    ready = httpx.get(cluster.http + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert_error(httpx.get(cluster.http + "/v1/nowhere"), 404)
    assert_error(httpx.get(cluster.http + "/v1/completions"), 405)
    metrics = httpx.get(cluster.http + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    # the HTTP API's /metrics is the coordinator's (coordinator/metrics.py), counting HTTP requests too
    def successes() -> float:
        return sum(scrape(cluster.http.removeprefix("http://")).get("pdserve:request_success_total", {}).values())
    before = successes()
    cluster.oai.completions.create(model=chat_model, prompt=[1, 2], max_tokens=2, **GREEDY)
    wait_until(lambda: successes() == before + 1, 10, "the HTTP request to be counted")


def bad_bodies(vocab: int):
    """(body, status, words in the message): the gRPC suite's bad inputs (tests/test_cluster.py), and
    what only HTTP can get wrong."""
    base = {"prompt": [1, 2], "max_tokens": 4}
    out = [({**base, **kw}, 400, words) for kw, words in [
        (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(min_p=2.0), "min_p"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[vocab]), "stop_token_ids"),
        (dict(prompt=[]), "empty"), (dict(prompt=""), "empty"), (dict(prompt=[1, 2, vocab]), "out of range"),
        (dict(prompt=[-5]), "out of range"), (dict(prompt=list(range(1, 300)) * 30), "context"),
        (dict(max_tokens=CONTEXT - 1), "exceeds the context"), (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-1), "max_tokens"), (dict(seed=-1), "seed"), (dict(n=0), "n"),
        # wrong types, unknown and unsupported fields
        (dict(temperature="hot"), "temperature"), (dict(max_tokens="4"), "max_tokens"), (dict(prompt=5), "prompt"),
        (dict(n=True), "n"), (dict(stream="yes"), "stream"), (dict(typo_field=1), "typo_field"),
        (dict(logprobs=2), "logprobs"), (dict(echo=True), "echo"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
        (dict(best_of=3), "best_of"), (dict(top_k=2**70), "")]]
    out.append(({**base, "model": "no-such-model"}, 404, "no-such-model"))
    out += [(b'{"prompt": [1, 2], "max_tokens": 4', 400, "JSON"), (b"", 400, "JSON"), (b"[1, 2]", 400, ""),
            (b'{"prompt": [1, 2], "max_tokens": 4, "temperature": NaN}', 400, ""),
            (b'{"prompt": [1, 2], "max_tokens": 4, "temperature": Infinity}', 400, ""),
            (b'{"prompt": "\xff\xfe bad", "max_tokens": 4}', 400, "JSON"),  # not UTF-8
            (b'{"prompt": "\\ud800 lone surrogate", "max_tokens": 4}', 400, "")]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    out += [(("chat", {**chat, **kw}), 400, words) for kw, words in [
        (dict(messages=[]), "messages"), (dict(messages=[{"role": "wizard", "content": "hi"}]), "role"),
        (dict(messages=[{"role": "user", "content": 5}]), "content"), (dict(logprobs=True), "logprobs"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(max_completion_tokens=0), "max_tokens"), (dict(stream_options={"include_usage": True}), "stream")]]
    return out


def test_every_bad_input_gets_an_openai_error_and_leaves_a_concurrent_stream_alone(cluster, chat_model):
    expected = cluster.grpc.generate(request(list(range(3, 40)), greedy(40, ignore_eos=True)))
    got = {}

    def good():
        with httpx.stream("POST", cluster.http + "/v1/completions", timeout=120,
                          json={"prompt": list(range(3, 40)), "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                                "stream": True, "return_token_ids": True}) as r:
            got["events"] = sse(r.iter_lines())
    thread = threading.Thread(target=good)
    thread.start()
    for body, status, words in bad_bodies(49152):
        path = "/v1/completions"
        if isinstance(body, tuple):
            path, body = "/v1/chat/completions", body[1]
        for stream in ((False, True) if isinstance(body, dict) and not {"stream", "stream_options"} & set(body)
                           else (False,)):
            sent = {**body, "stream": True} if stream else body
            assert_error(post(cluster.http, path, sent), status, words)
    thread.join()
    events = got["events"]
    assert events[-1] == "[DONE]"
    assert [t for e in events[:-1] for t in e["choices"][0]["token_ids"]] == expected["token_ids"]
    cluster.grpc.wait_blocks_at_baseline()


def test_the_openai_client_sees_bad_requests_as_its_exceptions(cluster, chat_model):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        cluster.oai.completions.create(model=chat_model, prompt=[1, 2], max_tokens=4, top_p=1.5)
    assert e.value.status_code == 400 and "top_p" in e.value.message and e.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError) as e:
        cluster.oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_an_oversize_body_gets_413_declared_or_chunked_without_disturbing_others(cluster):
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'", "max_tokens": 1}'
    assert_error(post(cluster.http, "/v1/completions", big), 413, "bytes")

    def pieces():
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]
    chunked = httpx.post(cluster.http + "/v1/completions", content=pieces(), timeout=60)
    assert_error(chunked, 413, "bytes")
    ok = post(cluster.http, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_request_and_frees_kv(cluster, stream):
    body = json.dumps({"prompt": list(range(1, 30)), "max_tokens": CONTEXT - 100, "ignore_eos": True,
                       "temperature": 0, "stream": stream}).encode()
    host, port = cluster.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:  # raw: closed exactly when the test says
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_until(lambda: any(n["running"] for n in cluster.grpc.status()["nodes"]), 30, "the request to run")
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    cluster.grpc.wait_blocks_at_baseline()


@pytest.mark.slow
def test_smollm2_chat_over_http_equals_pdserve_generate(smol_dir):
    """The default model: a chat through the openai client (whole and streamed) gives the
    tokens and text of `pdserve generate --coordinator --chat --json`, which runs the gRPC path."""
    import subprocess
    import sys
    c = start_http_cluster(None, kv_blocks=256)
    try:
        question = "What is the capital of France?"
        r = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--coordinator", c.cfg.listen, "--chat",
                            "--json", "--max-tokens", "24", "--temperature", "0", question],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        cli = json.loads(r.stdout)
        oai = openai_client(c.http)
        messages = [{"role": "user", "content": question}]
        whole = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24,
                                            temperature=0, extra_body={"return_token_ids": True})
        assert whole.choices[0].token_ids == cli["token_ids"] and whole.choices[0].message.content == cli["text"]
        assert whole.usage.prompt_tokens == len(cli["prompt_token_ids"])
        assert whole.choices[0].finish_reason == cli["finish_reason"]
        chunks = list(oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24,
                                                  temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cli["text"]
        Client(c.cfg.listen).wait_blocks_at_baseline()
    finally:
        c.stop()
