"""Streamed sends of RankKV (GPU): each part's send is a generator that yields, before
each message, the last layer that message needs; the scheduler advances the generators
as the forward reports its layers queued, oldest transfer first on each pair."""
from __future__ import annotations

import logging
from collections.abc import Callable, Generator

from .state import Pair, Part

log = logging.getLogger(__name__)

SendSteps = Generator[int, None, None]  # yields the layer its next message waits for


class StreamScheduler:
    """close(pair, reason): what a failure does to the pair (RankKV._close)."""

    def __init__(self, close: Callable[[Pair, str], None]):
        self._close = close
        self._streams: list[list] = []  # [part, its send generator, the layer it waits for], in send() order

    def __bool__(self) -> bool:
        return bool(self._streams)

    def add(self, part: Part, gen: SendSteps) -> None:
        part.streaming = True
        self._streams.append([part, gen, -1])

    def abort(self, reason: str) -> None:
        """The forward failed before every layer was queued: the streamed sends not fully
        queued fail and their pairs close (the receiver would wait for the rest)."""
        streams, self._streams = self._streams, []
        for part, gen, _ in streams:
            gen.close()
            part.streaming = False
            part.error = part.error or reason
            self._close(part.pair, part.error)

    def run(self, layer: int) -> None:
        """Advance each streamed send while the layer its next group waits for is queued
        (<= layer), in send() order. On a pair only the oldest unfinished transfer advances:
        its messages must all precede the next transfer's, as the receiver posts them."""
        busy, keep = set(), []
        for entry in self._streams:
            part, gen = entry[0], entry[1]
            pair = part.pair
            if pair.closed:  # the part fails at the next poll()
                gen.close()
                part.streaming = False
                continue
            if pair.name in busy:
                keep.append(entry)
                continue
            try:
                while entry[2] is not None and entry[2] <= layer:
                    entry[2] = next(gen, None)
            except Exception as e:  # noqa: BLE001 - reported through poll(), as any transfer failure
                log.exception("KV send on pair %s failed", pair.name)
                part.streaming = False
                part.error = f"send failed on pair {pair.name}: {type(e).__name__}: {e}"
                self._close(pair, part.error)
                continue
            if entry[2] is None:
                part.streaming = False
            else:
                busy.add(pair.name)
                keep.append(entry)
        self._streams = keep


def exhaust(gen: SendSteps) -> None:
    """Run a send that waits for no layer (its KV is computed already) to its end."""
    for _ in gen:
        raise RuntimeError("a send without layer events waited for a layer")
