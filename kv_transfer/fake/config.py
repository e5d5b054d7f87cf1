"""The fake KV backend has no settings."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeConfig:
    pass
