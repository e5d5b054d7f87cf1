"""Prometheus helpers every role shares (torch-free): a metrics HTTP server on a
HOST:PORT flag, and a histogram whose observations are gathered and added in batches."""
from __future__ import annotations

from bisect import bisect_left

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


class HistogramTally:
    """Observations of one histogram (and a counter of their number) gathered in plain
    Python and added to the shared metric by flush(): for values that come per message,
    where a metric update each (in multiprocess mode a locked write to a memory-mapped
    file) would cost more than the relay's own work. Adds to the histogram's value slots
    as observe() does, in prometheus_client 0.2x's layout."""

    def __init__(self, hist: Histogram, counter=None):
        self.hist, self.counter = hist, counter
        self.bounds = list(hist._upper_bounds)
        self._reset()

    def _reset(self) -> None:
        self.buckets, self.sum, self.count = [0] * len(self.bounds), 0.0, 0

    def add(self, value: float, count: int = 1) -> None:
        """`count` observations of `value`."""
        self.buckets[bisect_left(self.bounds, value)] += count
        self.sum += value * count
        self.count += count

    def count_only(self, count: int) -> None:
        """`count` more for the counter alone (what has no observation of its own)."""
        self.count += count

    def flush(self) -> None:
        if not self.count:
            return
        buckets, total, count = self.buckets, self.sum, self.count
        self._reset()
        if any(buckets):
            self.hist._sum.inc(total)
            for slot, n in zip(self.hist._buckets, buckets):
                if n:
                    slot.inc(n)
        if self.counter is not None:
            self.counter.inc(count)
