"""The coordinator's Prometheus metrics: vLLM's names and units with a `pdserve:` prefix
where the meaning is the same, plus what only a disaggregated system has (TTFT by
phase, requests per phase, migrations, retries).

Updates are per request; what comes per relayed response (generated tokens, inter-token
gaps: a response's k tokens are k gaps) is gathered in plain Python and added every
FLUSH_S, so values lag by that much at most. With `--workers N` every worker
writes its values to a directory the supervisor made (prometheus_client's multiprocess
mode, PROMETHEUS_MULTIPROC_DIR in the workers' environment); any process reading that
directory exposes the sum over all workers, the per-phase gauges as live sums. The
node table (KV usage, node load) is read from this process's registry at scrape time.

exposition() is what GET /metrics answers; --metrics-listen serves the same."""
from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from pdserve.common.phases import PHASES, ttft_phases
from pdserve.common.prom import HistogramTally
from pdserve.v1 import api_pb2

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own switch to multiprocess mode
P = "pdserve:"

# vLLM's buckets, with finer steps below 10 ms for GPU decode
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

REGISTRY = CollectorRegistry()  # this process's own metrics

TTFT = Histogram(P + "time_to_first_token_seconds", "Time from a request's arrival to its first token leaving "
                 "for the client", buckets=TTFT_BUCKETS, registry=REGISTRY)
TTFT_PHASE = Histogram(P + "ttft_phase_seconds", "TTFT split into consecutive phases: queue (until decode blocks "
                       "were reserved), prefill, transfer (KV to the decode node), admission (until the first token "
                       "left); they add up to the TTFT", ["phase"], buckets=TTFT_BUCKETS, registry=REGISTRY)
ITL = Histogram(P + "inter_token_latency_seconds", "Time between tokens written to a client (a response of k "
                "tokens counts k gaps of its wait / k)", buckets=ITL_BUCKETS, registry=REGISTRY)
E2E = Histogram(P + "e2e_request_latency_seconds", "Time from arrival to the last token of finished requests",
                buckets=E2E_BUCKETS, registry=REGISTRY)
QUEUE_TIME = Histogram(P + "request_queue_time_seconds", "Time from arrival until decode blocks were reserved",
                       buckets=E2E_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter(P + "prompt_tokens", "Prompt tokens of requests that were prefilled", registry=REGISTRY)
GENERATION_TOKENS = Counter(P + "generation_tokens", "Tokens written to clients", registry=REGISTRY)
SUCCESS = Counter(P + "request_success", "Requests that ended normally, by finish reason (abort: the client "
                  "cancelled)", ["finished_reason"], registry=REGISTRY)
FAILURE = Counter(P + "request_failure", "Requests that ended with an error status, by status code", ["code"],
                  registry=REGISTRY)
MIGRATIONS = Counter(P + "migrations", "Requests moved to another decode node after theirs was lost mid-stream",
                     registry=REGISTRY)
RETRIES = Counter(P + "prefill_retries", "Prefill attempts that failed and were tried again, by cause "
                  "(transfer: the KV transfer failed; node: a node was lost or failed)", ["reason"],
                  registry=REGISTRY)

# what a request waits for: one gauge per stage (RequestRecord.stage)
_stage_help = {
    "waiting": (P + "num_requests_waiting", "Requests waiting for a decode reservation (the coordinator's queue)"),
    "prefill": (P + "num_requests_prefilling", "Requests reserved on a decode node whose prefill or KV transfer "
                                              "runs"),
    "admission": (P + "num_requests_waiting_admission", "Requests whose first token was sent and whose decode "
                                                        "node has not yet admitted them to its batch"),
    "decode": (P + "num_requests_decoding", "Requests in a decode node's batch"),
}
STAGES = {s: Gauge(name, text, multiprocess_mode="livesum", registry=REGISTRY)
          for s, (name, text) in _stage_help.items()}
# sums of the stage gauges, made when scraped (Exposition): no update of their own per request
DERIVED = {P + "num_requests_running": ("Requests past the queue and not yet ended (prefill, transfer, admission, "
                                        "decode)", ("prefill", "admission", "decode")),
           P + "num_requests_waiting_reservation": ("Requests waiting for a decode reservation (= "
                                                    "num_requests_waiting)", ("waiting",))}

_FINISH = {api_pb2.FINISH_REASON_STOP: "stop", api_pb2.FINISH_REASON_LENGTH: "length"}


def stage_of(state: str, decode_started: bool) -> str | None:
    """The stage gauge a request in `state` counts in (None: ended)."""
    if state == "QUEUED":
        return "waiting"
    if state in ("RESERVED", "PREFILLING"):
        return "prefill"
    if state == "DECODING":
        return "decode" if decode_started else "admission"
    return None


def moved(old: str | None, new: str | None) -> None:
    """A request left stage `old` for `new` (None: not counted)."""
    if old is not None:
        STAGES[old].dec()
    if new is not None:
        STAGES[new].inc()


def first_token(record) -> None:
    """The request's first token left (record.times.first_token is set)."""
    t = record.times
    TTFT.observe(t.first_token - t.received)
    phases = ttft_phases(t)
    for name in PHASES:
        TTFT_PHASE.labels(name).observe(phases[name])
    QUEUE_TIME.observe(phases["queue"])
    PROMPT_TOKENS.inc(len(record.prompt))
    TOKENS.count_only(1)
    record.last_token_at = t.first_token


# generated tokens and their gaps, added to ITL and GENERATION_TOKENS by flush()
TOKENS = HistogramTally(ITL, GENERATION_TOKENS)
FLUSH_S = 0.5  # how often a process adds what TOKENS gathered (Coordinator.start_metrics runs it)


def tokens(record, count: int) -> None:
    """A response of `count` later tokens left for the client: count gaps of its wait / count."""
    now = time.time()
    TOKENS.add((now - record.last_token_at) / count, count)
    record.last_token_at = now


def flush() -> None:
    TOKENS.flush()


def finished(record, reason: int) -> None:
    E2E.observe(record.times.finished - record.times.received)
    SUCCESS.labels(_FINISH.get(reason, "stop")).inc()


def ended(record) -> None:
    """After the call ended, whatever way: a failed or cancelled request is counted here."""
    if record.state == "FAILED":
        FAILURE.labels(record.failure_code or "UNKNOWN").inc()
    elif record.state == "CANCELLED":
        SUCCESS.labels("abort").inc()


def migrated() -> None:
    MIGRATIONS.inc()


def retried(transfer: bool) -> None:
    RETRIES.labels("transfer" if transfer else "node").inc()


class _NodeTable:
    """Gauges from the node table this process holds (heartbeat loads), read at scrape time."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        usage = GaugeMetricFamily(P + "kv_cache_usage_perc", "KV blocks in use on each node, 0 to 1, as of its last "
                                  "heartbeat", labels=["node", "role"])
        running = GaugeMetricFamily(P + "node_num_requests_running", "Requests in each node's batch, as of its "
                                    "last heartbeat", labels=["node", "role"])
        waiting = GaugeMetricFamily(P + "node_num_requests_waiting", "Requests queued on each node (decode: with "
                                    "reservations waiting for their KV), as of its last heartbeat",
                                    labels=["node", "role"])
        nodes = GaugeMetricFamily(P + "nodes", "Registered nodes by role and liveness", labels=["role", "live"])
        counts: dict[tuple[str, str], int] = {}
        for n in list(self.registry.nodes.values()):
            role = api_pb2.Role.Name(n.role).removeprefix("ROLE_").lower()
            live = self.registry.live(n)
            counts[(role, str(live).lower())] = counts.get((role, str(live).lower()), 0) + 1
            if not live:
                continue
            total = max(1, n.kv_blocks_total)
            usage.add_metric([n.id, role], (n.kv_blocks_total - n.kv_blocks_free) / total)
            running.add_metric([n.id, role], n.running)
            waiting.add_metric([n.id, role], n.queued)
        for (role, live), count in sorted(counts.items()):
            nodes.add_metric([role, live], count)
        return [usage, running, waiting, nodes]


class Exposition:
    """What a scrape reads: this process's metrics, or with a multiprocess directory the
    sum over every process writing there; then the node table."""

    def __init__(self):
        self.directory = os.environ.get(MULTIPROC_ENV) or None
        self.nodes = None

    def collect(self):
        if self.directory:
            families = list(MultiProcessCollector(None, path=self.directory).collect())
        else:
            families = list(REGISTRY.collect())
        stages = {name: 0.0 for name, _ in _stage_help.values()}
        for f in families:
            if f.name in stages:
                stages[f.name] = sum(s.value for s in f.samples)
        for name, (text, parts) in DERIVED.items():
            families.append(GaugeMetricFamily(name, text, value=sum(stages[_stage_help[p][0]] for p in parts)))
        if self.nodes is not None:
            families += self.nodes.collect()
        return families


EXPOSITION = Exposition()


def watch(registry, directory: str | None = None) -> Exposition:
    """Expose this node registry's table; directory: read the workers' values there (the
    supervisor, whose own environment does not name it)."""
    EXPOSITION.nodes = _NodeTable(registry)
    if directory:
        EXPOSITION.directory = directory
    return EXPOSITION


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format and its content type (GET /metrics)."""
    return generate_latest(EXPOSITION), CONTENT_TYPE_LATEST
