"""Coordinator: the gRPC front door. Keeps the node registry (register, heartbeats,
health), routes each request to a decode node (reserve blocks) and a prefill node
(prefill + KV shipping), relays the decode nodes' batched token streams to the
clients, and owns every request's lifecycle:

    QUEUED -> RESERVED -> PREFILLING -> DECODING -> FINISHED | CANCELLED | FAILED

PREFILLING lasts until the prefill node answers, which it does once the KV reached
the decode node, so the transfer has no state of its own; its end is a timestamp
(PhaseTimes.transfer_end). A retry or a migration sends the request back to QUEUED
(request.py, RequestRecord.unreserve).

With --workers N the client API is served by N worker processes on one port
(worker.py), each relaying its own requests; the supervisor (supervisor.py) owns the
registry, which every worker mirrors (mirror.py). metrics.py holds the Prometheus
metrics, updated as requests move through these states."""
