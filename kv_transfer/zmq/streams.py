"""The hand-over between the ZeroMQ backend's two halves in one process: the prefill
node's manager makes each streamed sender offer itself under its KVSave key, and rank 0's
connector worker (same process, engine thread) claims it when the step that saves it
starts. Keys come from one counter per process, so nodes sharing a process never collide;
an offer nobody claimed goes when its sender ends."""
from __future__ import annotations

import itertools
import threading
from typing import Protocol

import torch


class LayerSink(Protocol):
    """What the worker may do with a claimed sender (ZmqKVSender)."""

    def send_layers(self, layer_start: int, layers: list[list[torch.Tensor]]) -> None: ...

    def fail(self, error: str) -> None: ...


_lock = threading.Lock()
_offers: dict[int, LayerSink] = {}
_keys = itertools.count(1)


def new_key() -> int:
    return next(_keys)


def offer(key: int, sink: LayerSink) -> None:
    with _lock:
        _offers[key] = sink


def claim(key: int) -> LayerSink | None:
    """The sink offered under key, once (None: its sender ended before the step)."""
    with _lock:
        return _offers.pop(key, None)


def drop(key: int) -> None:
    with _lock:
        _offers.pop(key, None)


def offered() -> int:
    """Offers not claimed yet (tests check that none is left behind)."""
    with _lock:
        return len(_offers)
