"""Prometheus helpers every role shares (torch-free): a metrics HTTP server on a
HOST:PORT flag, and a histogram update for many equal observations at once."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_wsgi_server


class MetricsServer:
    """prometheus_client's WSGI server on `listen` (HOST:PORT; port 0: any free port),
    serving `registry` from a thread of its own."""

    def __init__(self, listen: str, registry: CollectorRegistry):
        self.listen, self.registry = listen, registry
        self.server = None
        self.address = ""

    def start(self) -> str:
        host, port = self.listen.rsplit(":", 1)
        self.server, self.thread = start_wsgi_server(int(port), addr=host.strip("[]"), registry=self.registry)
        self.address = f"{host}:{self.server.server_port}"
        return self.address

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5.0)
            self.server = None


def observe_many(hist: Histogram, value: float, count: int) -> None:
    """hist.observe(value) `count` times in one update (a batch of tokens with one gap
    each): the bucket and sum updates observe() makes, times count. Uses the histogram's
    value slots, as prometheus_client 0.2x lays them out."""
    if count <= 0:
        return
    if count == 1:
        hist.observe(value)
        return
    hist._raise_if_not_observable()
    hist._sum.inc(value * count)
    for i, bound in enumerate(hist._upper_bounds):
        if value <= bound:
            hist._buckets[i].inc(count)
            break
