"""A decode node's TokenBatch (one per engine step, in columns: proto/pdserve/v1/node.proto)
handed to the requests its rows belong to. Rows of an earlier attempt, or of a node the
request moved off, are fenced off here."""
from __future__ import annotations

from pdserve.coordinator.request import RequestRecord
from pdserve.v1 import node_pb2


def deliver(batch: node_pb2.TokenBatch, node, requests: dict[str, RequestRecord], bound: int) -> list[RequestRecord]:
    """Push each row to its request; returns the requests that would have more than
    `bound` tokens waiting for their client (their rows are not taken)."""
    for ev in batch.events:
        record = _owner(ev.request_id, node, requests)
        if record is None:
            continue
        if ev.error:
            record.failed_on_node(ev.error_code, ev.error)
        elif ev.decode_start:
            record.decode_started(ev.decode_start, ev.kv_ready)
    over = []
    tokens, start = list(batch.token_ids), 0  # columns to lists at once: cheaper than element by element
    for key, index, n, text, finish in zip(list(batch.request_ids), list(batch.first_index), list(batch.counts),
                                           list(batch.texts), list(batch.finish_reasons)):
        record = requests.get(key.rpartition("/")[0])
        if record is not None and record.key == key and record.decode is node and not record.lost \
                and not record.push(index, tokens[start:start + n], text, finish, bound):
            over.append(record)
        start += n
    return over


def _owner(key: str, node, requests: dict[str, RequestRecord]) -> RequestRecord | None:
    """The request whose current attempt on this node `key` names (RequestRecord.key): rows
    of an earlier attempt, or of a node the request moved off, belong to none."""
    record = requests.get(key.rpartition("/")[0])
    if record is not None and record.key == key and record.decode is node and not record.lost:
        return record
    return None
