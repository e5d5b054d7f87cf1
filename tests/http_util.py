"""Helpers for the HTTP API tests: a cluster whose coordinator serves --http-listen, the
official openai client pointed at it, and raw requests for what that client cannot send."""
from __future__ import annotations

import json

import httpx

from pdserve.cluster import free_port
from tests.cluster_util import start_cluster


def start_http_cluster(model: str, **kw):
    """A cluster (tiny model with a tokenizer) with the HTTP API; .http is its base URL."""
    http = f"127.0.0.1:{free_port()}"
    cluster = start_cluster(model=model, http_listen=http, **kw)
    cluster.http = f"http://{http}"
    return cluster


def openai_client(base: str, **kw):
    import openai
    return openai.OpenAI(base_url=f"{base}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def iter_sse(lines):
    """The events of a server-sent-event stream as they come: each `data:` payload, parsed unless [DONE]."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def sse(lines) -> list[dict | str]:
    return list(iter_sse(lines))


def post(base: str, path: str, body, **kw) -> httpx.Response:
    """body: a dict (sent as JSON) or raw bytes."""
    if isinstance(body, (bytes, str)):
        return httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=60, **kw)
    return httpx.post(base + path, json=body, timeout=60, **kw)


def assert_error(resp: httpx.Response, status: int, words: str = "") -> dict:
    """An OpenAI error object with this HTTP status; `words` in its message."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and words in err["message"], (words, err)
    return err
