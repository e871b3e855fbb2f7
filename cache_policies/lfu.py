"""Least frequently used: evict the candidate compute has used the fewest times."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.keys import ExpertKey
from cache_policies.recency import Recency


class LFUPolicy(CachePolicy):
    """Least frequently used; ties go to the least recently used, then the smallest key.

    Only ``on_access`` counts as a use: a prefetched expert that compute never asked for has
    earned nothing. By default the counts *persist across evictions* ("perfect" LFU): the key
    space is small and fixed (layers x experts, 256 for Mixtral 8x7B), so the memory is bounded,
    and what LFU should capture is how popular an expert is with the router over the whole run,
    not how often it was hit during its latest stay in the pool. ``persistent=False`` gives
    in-cache LFU, which forgets a key's count when it is evicted.

    Recency is the order of ``on_insert``/``on_access`` calls (a private tick), so ties on the
    count are broken without ever needing the key order for resident keys.
    """

    name: ClassVar[str] = "lfu"

    def __init__(self, persistent: bool = True) -> None:
        self.persistent = persistent
        self._count: dict[ExpertKey, int] = {}
        self._recency = Recency()

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)
        self._count[key] = self._count.get(key, 0) + 1

    def on_evict(self, key: ExpertKey) -> None:
        self._recency.forget(key)
        if not self.persistent:
            self._count.pop(key, None)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)
        count, last = self._count, self._recency.ticks
        return min(candidates, key=lambda k: (count.get(k, 0), last.get(k, 0), k))

    def reset(self) -> None:
        self._count.clear()
        self._recency.reset()

    def __repr__(self) -> str:
        return f"LFUPolicy(persistent={self.persistent})"
