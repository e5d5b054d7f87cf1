"""A request's time to first token split into consecutive phases from its PhaseTimes
(proto/pdserve/v1/api.proto), for `generate --json` and the coordinator's metrics."""
from __future__ import annotations

PHASES = ("queue", "prefill", "transfer", "admission")


def ttft_phases(t) -> dict[str, float]:
    """queue: received -> decode blocks reserved (tokenizing, waiting for capacity, retries);
    prefill: -> the prompt's step ended; transfer: -> the KV was verified on the decode node
    (0 where no KV moves: colocated); admission: -> the first token left for the client.
    Node clocks may differ from the coordinator's: each boundary is clamped into
    [previous, first_token], so the phases are >= 0 and add up to the TTFT exactly."""
    end = t.first_token
    marks = [t.received]
    for point in (t.reserved, t.prefill_end, t.transfer_end or t.prefill_end):
        marks.append(min(max(point, marks[-1]), end))
    marks.append(max(end, marks[-1]))
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(PHASES)}


def decode_admission_s(t) -> float:
    """From the KV's arrival (colocated: the prefill's end) to joining the decode batch; 0
    before the request joined one."""
    if not t.decode_start:
        return 0.0
    return max(0.0, t.decode_start - (t.transfer_end or t.prefill_end))
