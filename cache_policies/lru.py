"""Least recently used: evict the candidate touched longest ago."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.keys import ExpertKey


class LRUPolicy(CachePolicy):
    """Least recently used, where both an insert and an access count as a use.

    Recency is the order of ``on_insert``/``on_access`` calls, not the value of ``now``: a
    prefetch batch inserted at one ``now`` is still totally ordered (by call order), so there
    are no ties and the victim is deterministic.

    The order lives in an ``OrderedDict`` (oldest first), so a hit is one C-level
    ``move_to_end`` and ``choose_victim`` walks from the oldest end, stopping at the first key
    that is a candidate. Only pinned keys can be skipped, so the walk is short.
    """

    name: ClassVar[str] = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        try:
            self._order.move_to_end(key)
        except KeyError:  # tolerate a pool that skipped on_insert: treat the access as one
            self._order[key] = None

    def on_evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        for key in self._order:
            if key in candidates:
                return key
        # Only reachable if the pool passed no candidates, or only keys it never inserted.
        require_candidates(candidates)
        return min(candidates)

    def reset(self) -> None:
        self._order.clear()
