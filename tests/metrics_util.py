"""Reading a cluster member's Prometheus metrics in tests."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.fault_util import wait_until


def scrape(address: str) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m, name: str, **labels) -> float:
    """One sample's value (0 if absent); histogram buckets are matched without `le`."""
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def settled(address: str, generated: int) -> dict:
    """The coordinator's metrics once its generated tokens are all counted: what comes per
    response is added every FLUSH_S (coordinator/metrics.py)."""
    return wait_until(lambda: (lambda m: m if value(m, "pdserve:generation_tokens_total") >= generated else None)(
        scrape(address)), 10, f"{generated} generated tokens to be counted")
