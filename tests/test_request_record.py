"""The coordinator's relay of decode rows: what waits leaves as one response, duplicates
are dropped, gaps fail loudly, a client that lags past the bound is refused, and after a
migration the new node's indexes continue where the client's stream is."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.coordinator.request import RequestRecord
from pdserve.coordinator.tokens import deliver
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2

NODE = object()


def batch(*rows, events=()) -> node_pb2.TokenBatch:
    """rows: (key, index, token[, finish]) of one token each."""
    out = node_pb2.TokenBatch(events=list(events))
    for key, index, token, *finish in rows:
        out.request_ids.append(key)
        out.first_index.append(index)
        out.counts.append(1)
        out.token_ids.append(token)
        out.texts.append(f"<{token}>")
        out.finish_reasons.append(finish[0] if finish else 0)
    return out


def record() -> RequestRecord:
    r = RequestRecord("r", [1, 2], api_pb2.SamplingParams(max_tokens=8), "")
    r.decode = NODE
    r.first_response(node_pb2.PrefillResponse(first_token=9))
    return r


def relay(r: RequestRecord):
    return asyncio.run(r.relay())


def test_rows_of_several_steps_leave_as_one_response_and_duplicates_are_dropped():
    r = record()
    requests = {"r": r}
    assert deliver(batch(("r/0", 0, 9), ("r/0", 1, 10)), NODE, requests, 64) == []  # index 0: the prefill token
    deliver(batch(("r/0", 1, 10)), NODE, requests, 64)
    deliver(batch(("r/0", 2, 11, api_pb2.FINISH_REASON_LENGTH), ("other/0", 1, 5)), NODE, requests, 64)
    resp, finish, lost = relay(r)
    assert list(resp.token_ids) == [10, 11] and resp.index == 1 and resp.text == "<10><11>"
    assert finish == api_pb2.FINISH_REASON_LENGTH and not lost and r.pending == []


def test_rows_of_another_attempt_or_node_are_fenced_off():
    r = record()
    deliver(batch(("r/1", 1, 10)), NODE, {"r": r}, 64)  # a later attempt's key
    deliver(batch(("r/0", 1, 10)), object(), {"r": r}, 64)  # a node the request is not on
    assert r.pending == [] and r.received == 1


def test_a_gap_in_the_token_stream_fails_the_request_instead_of_waiting_forever():
    r = record()
    deliver(batch(("r/0", 1, 10), ("r/0", 3, 12)), NODE, {"r": r}, 64)
    with pytest.raises(RpcError) as e:
        relay(r)
    assert e.value.code == grpc.StatusCode.INTERNAL and "gap" in e.value.message


def test_an_error_event_carries_the_node_status():
    r = record()
    bad = node_pb2.TokenEvent(request_id="r/0", error="KV transfer failed: checksum",
                              error_code=grpc.StatusCode.UNAVAILABLE.value[0])
    deliver(batch(events=[bad]), NODE, {"r": r}, 64)
    with pytest.raises(RpcError) as e:
        relay(r)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_first_event_sets_the_decode_times():
    r = record()
    deliver(batch(("r/0", 1, 10), events=[node_pb2.TokenEvent(request_id="r/0", decode_start=5.0, kv_ready=4.0)]),
            NODE, {"r": r}, 64)
    assert r.times.decode_start == 5.0 and r.times.transfer_end == 4.0


def test_a_lagging_client_is_refused_past_the_bound_and_nothing_more_waits():
    r = record()
    requests = {"r": r}
    for i in range(1, 4):
        assert deliver(batch(("r/0", i, 10 + i)), NODE, requests, 3) == []
    assert deliver(batch(("r/0", 4, 14)), NODE, requests, 3) == [r]
    assert len(r.pending) == 3
    resp, _, _ = relay(r)
    assert list(resp.token_ids) == [11, 12, 13]
    assert deliver(batch(("r/0", 4, 14)), NODE, requests, 3) == []  # room again once written


def test_a_lost_decode_node_keeps_the_tokens_before_it_and_the_migration_continues_the_indexes():
    r = record()
    deliver(batch(("r/0", 1, 10), ("r/0", 2, 11)), NODE, {"r": r}, 64)
    r.decode_lost()
    deliver(batch(("r/0", 3, 12)), NODE, {"r": r}, 64)  # fenced: the node is gone
    resp, finish, lost = relay(r)
    assert list(resp.token_ids) == [10, 11] and lost and not finish
    r.migrate()
    assert r.run_prompt == [1, 2, 9, 10, 11] and r.run_sampling.max_tokens == 5 and r.sampling.max_tokens == 8
    assert r.continued_response(node_pb2.PrefillResponse(first_token=12)).index == 3
    r.decode = NODE
    deliver(batch(("r/1", 0, 12), ("r/1", 1, 13), ("r/1", 2, 14)), NODE, {"r": r}, 64)  # counts from its first token
    resp, finish, lost = relay(r)
    assert resp.index == 4 and list(resp.token_ids) == [13, 14] and r.generated == [9, 10, 11, 12, 13, 14]
