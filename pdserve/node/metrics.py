"""A node's Prometheus metrics (`--metrics-listen`), in a registry of its own.

Gauges (queue, batch, KV usage, requests per transfer stage) are read from the node at
scrape time, so they are exact and cost nothing per step; the KV transfer counters and
histogram are updated once per transfer by the prefill and decode servicers."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from pdserve.common.prom import MetricsServer

P = "pdserve:"
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GAUGE_HELP = {
    "num_requests_running": "Sequences in this node's engine batch",
    "num_requests_waiting": "Requests queued in this node's engine (decode: plus reservations waiting for KV)",
    "kv_cache_usage_perc": "KV blocks in use (reserved included), 0 to 1",
    "num_requests_in_transfer": "Requests whose KV is on its way (prefill: sent, not yet acknowledged; decode: "
                                "arriving)",
    "num_requests_waiting_reservation_kv": "Decode: reservations whose KV has not started arriving",
    "num_requests_waiting_admission": "Decode: requests whose KV arrived, joining the batch",
}


def failure_reason(error: str) -> str | None:
    """The reason label of a failed transfer's error; None for a transfer the request gave
    up itself (cancelled, aborted, withdrawn), which is no transport failure."""
    e = error.lower()
    if any(w in e for w in ("cancelled", "withdrawn", "aborted", "ended at its first token")):
        return None
    for words, reason in ((("lease expired",), "lease_expired"), (("epoch",), "stale_epoch"),
                          (("checksum", "verif", "mismatch"), "corrupt"),
                          (("no ack", "timeout", "timed out", "within"), "timeout"), (("closed",), "closed"),
                          (("refused",), "refused")):
        if any(w in e for w in words):
            return reason
    return "transport"


class NodeMetrics:
    def __init__(self, node):
        self.node = node
        self.registry = CollectorRegistry()
        self.transfer_seconds = Histogram(P + "kv_transfer_seconds", "Prefill: from the end of a prompt's step to "
                                          "the decode node's acknowledgement of its KV", ["transport"],
                                          buckets=TRANSFER_BUCKETS, registry=self.registry)
        self.transfer_bytes = Counter(P + "kv_transfer_bytes", "KV bytes of completed transfers (direction: sent "
                                      "by a prefill node, received by a decode node)", ["transport", "direction"],
                                      registry=self.registry)
        self.transfers = Counter(P + "kv_transfers", "Completed KV transfers", ["transport", "direction"],
                                 registry=self.registry)
        self.direction = "received" if node.kv_role.value == "decode" else "sent"
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of requests this node prefilled",
                                     registry=self.registry)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens this node's engine generated (a decode "
                                         "node's count leaves out each request's first, the prefill node's)",
                                         registry=self.registry)
        self.failures = Counter(P + "kv_transfer_failures", "Failed KV transfers by reason (lease_expired apart "
                                "from the transport's own failures)", ["transport", "reason"], registry=self.registry)
        self.registry.register(self)
        self.server: MetricsServer | None = None

    def collect(self):
        values = self.node.gauges() if self.node.engine is not None else {}
        for name, value in values.items():
            g = GaugeMetricFamily(P + name, GAUGE_HELP.get(name, name))
            g.add_metric([], value)
            yield g

    def transferred(self, transport: str, num_blocks: int, bytes_per_block: int, seconds: float | None) -> None:
        self.transfers.labels(transport, self.direction).inc()
        self.transfer_bytes.labels(transport, self.direction).inc(num_blocks * bytes_per_block)
        if seconds is not None:
            self.transfer_seconds.labels(transport).observe(max(0.0, seconds))

    def failed(self, transport: str, error: str) -> None:
        reason = failure_reason(error)
        if reason is not None:
            self.failures.labels(transport, reason).inc()

    def serve(self, listen: str) -> str:
        self.server = MetricsServer(listen, self.registry)
        return self.server.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
