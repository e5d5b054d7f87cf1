"""The HTTP API's pieces without a cluster: each status a coordinator request can end with
becomes the HTTP status and OpenAI error object a client expects, and request bodies
become the coordinator requests they mean."""
from __future__ import annotations

import grpc
import pytest

from pdserve.coordinator.admission import Admission
from pdserve.coordinator.http.errors import ApiError
from pdserve.coordinator.http.protocol import ChatRequest, CompletionRequest
from pdserve.wire.rpc import RpcError


@pytest.mark.parametrize("code, status, kind", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
    (grpc.StatusCode.INTERNAL, 500, "server_error"),
])
def test_each_grpc_status_maps_to_its_http_status_and_openai_error_type(code, status, kind):
    err = ApiError.of(RpcError(code, "what happened"))
    body = err.body()["error"]
    assert err.status == status and body["type"] == kind and body["message"] == "what happened"
    assert set(body) == {"message", "type", "param", "code"}


def test_an_engine_check_names_its_parameter_and_a_value_error_is_a_400():
    err = ApiError.of(ValueError("top_p must be in (0, 1], got 1.5"))
    assert err.status == 400 and err.param == "top_p"
    assert ApiError.of(MemoryError()).status == 429
    assert ApiError.of(RpcError(grpc.StatusCode.NOT_FOUND, "model 'x' is not served")).body()["error"]["code"] == \
        "model_not_found"


def test_an_admission_refusal_carries_its_retry_hint_as_retry_after():
    refusal = Admission(1, 0).refusal("full")  # gRPC: trailing metadata retry-after-ms
    resp = ApiError.of(refusal).response()
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    assert "retry-after" not in ApiError.of(RpcError(grpc.StatusCode.UNAVAILABLE, "x")).response().headers


def test_a_completion_body_becomes_one_request_per_prompt_and_choice():
    body = CompletionRequest.model_validate_json(
        '{"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 5, "seed": 10, "stop": "x", "top_k": 4, "user": "u"}')
    reqs = body.requests()
    assert [list(r.token_ids.ids) for r in reqs] == [[1, 2], [1, 2], [3], [3]]
    assert [r.sampling.seed for r in reqs] == [10, 11, 10, 11]
    assert all(list(r.sampling.stop) == ["x"] and r.sampling.top_k == 4 and r.client_tag == "u" for r in reqs)
    assert not reqs[0].sampling.HasField("temperature")  # unset: the engine's default


def test_a_chat_without_a_token_limit_asks_for_the_rest_of_the_context():
    body = ChatRequest.model_validate_json('{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
                                           ' {"type": "text", "text": "b"}]}]}')
    (req,) = body.requests()
    assert req.sampling.max_tokens == 0 and req.chat.messages[0].content == "ab"
    limited = ChatRequest.model_validate_json('{"messages": [{"role": "user", "content": "a"}], "max_tokens": 9, '
                                              '"max_completion_tokens": 3}')
    assert limited.requests()[0].sampling.max_tokens == 3
