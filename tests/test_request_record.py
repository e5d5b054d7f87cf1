"""The coordinator's relay of decode updates: duplicates dropped, gaps fail loudly,
and after a migration the new node's indexes continue where the client's stream is."""
from __future__ import annotations

import grpc
import pytest

from pdserve.coordinator.request import DECODE_LOST, RequestRecord
from pdserve.wire.rpc import RpcError
from pdserve.v1 import api_pb2, node_pb2


def update(index: int, token: int, finish: int = 0) -> node_pb2.TokenUpdate:
    return node_pb2.TokenUpdate(request_id="r", index=index, token_id=token, text=f"<{token}>", finish_reason=finish)


def record() -> RequestRecord:
    return RequestRecord("r", [1, 2], api_pb2.SamplingParams(max_tokens=8), "")


def test_updates_of_one_step_merge_into_one_response_and_duplicates_are_dropped():
    resp, finish, lost = record().relay([update(1, 10), update(1, 10), update(2, 11, api_pb2.FINISH_REASON_LENGTH)], 1)
    assert list(resp.token_ids) == [10, 11] and resp.index == 1 and resp.text == "<10><11>"
    assert finish == api_pb2.FINISH_REASON_LENGTH and not lost


def test_a_gap_in_the_token_stream_fails_the_request_instead_of_waiting_forever():
    with pytest.raises(RpcError) as e:
        record().relay([update(1, 10), update(3, 12)], 1)
    assert e.value.code == grpc.StatusCode.INTERNAL and "gap" in e.value.message


def test_an_error_update_carries_the_node_status():
    bad = node_pb2.TokenUpdate(request_id="r", error="KV transfer failed: checksum",
                               error_code=grpc.StatusCode.UNAVAILABLE.value[0])
    with pytest.raises(RpcError) as e:
        record().relay([bad], 1)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_lost_decode_node_keeps_the_tokens_before_it_and_the_migration_continues_the_indexes():
    r = record()
    r.first_response(node_pb2.PrefillResponse(first_token=9))
    resp, finish, lost = r.relay([update(1, 10), update(2, 11), DECODE_LOST], 1)
    assert list(resp.token_ids) == [10, 11] and lost and not finish
    r.migrate()
    assert r.run_prompt == [1, 2, 9, 10, 11] and r.run_sampling.max_tokens == 5 and r.sampling.max_tokens == 8
    assert r.continued_response(node_pb2.PrefillResponse(first_token=12)).index == 3
    resp, finish, lost = r.relay([update(1, 13), update(2, 14)], 4)  # the new node counts from its own first token
    assert resp.index == 4 and list(resp.token_ids) == [13, 14] and r.generated == [9, 10, 11, 12, 13, 14]
