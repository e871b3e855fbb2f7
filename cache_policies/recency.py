"""Recency bookkeeping shared by the policies that break ties by least recent use."""

from __future__ import annotations

from cache_policies.keys import ExpertKey


class Recency:
    """Order of ``on_insert``/``on_access`` calls per key: a private counter, not ``now``, so
    keys the policy has seen never tie on recency."""

    def __init__(self) -> None:
        self._tick = 0
        self.ticks: dict[ExpertKey, int] = {}  # key -> tick of its latest insert/access

    def touch(self, key: ExpertKey) -> None:
        self._tick += 1
        self.ticks[key] = self._tick

    def forget(self, key: ExpertKey) -> None:
        self.ticks.pop(key, None)

    def reset(self) -> None:
        self._tick = 0
        self.ticks.clear()
