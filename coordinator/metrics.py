"""The coordinator's Prometheus metrics."""
from __future__ import annotations


def exposition() -> tuple[bytes, str]:
    """The text exposition of this process's metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
