"""A bounded set of ids remembered for a while (abort tombstones, requests seen lately):
each id lives ttl_s seconds, and past max_ids the oldest go first."""
from __future__ import annotations

import time
from collections import OrderedDict


class RecentIds:
    def __init__(self, ttl_s: float = 60.0, max_ids: int = 4096):
        self.ttl_s, self.max_ids = ttl_s, max_ids
        self._until: OrderedDict[str, float] = OrderedDict()  # id -> expiry (monotonic), oldest first

    def add(self, key: str) -> None:
        now = time.monotonic()
        self._until.pop(key, None)
        self._until[key] = now + self.ttl_s
        self._prune(now)

    def discard(self, key: str) -> bool:
        """Forget key; True if it was remembered."""
        live = key in self
        self._until.pop(key, None)
        return live

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > time.monotonic()

    def __len__(self) -> int:
        self._prune(time.monotonic())
        return len(self._until)

    def _prune(self, now: float) -> None:
        while self._until and (len(self._until) > self.max_ids or next(iter(self._until.values())) <= now):
            self._until.popitem(last=False)
