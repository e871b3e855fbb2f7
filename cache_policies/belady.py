"""Belady's MIN ("opt"): the clairvoyant baseline that replays a known access sequence.

Evicting the resident key whose next use lies farthest in the future minimises misses for a
demand-paged cache (Belady, 1966), so it bounds what any online policy can reach on a trace. It
needs the whole future, so it exists for the simulator (and for replaying a recorded trace
through the runtime), not for live generation.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from collections.abc import Sequence
from typing import ClassVar, Final

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.keys import ExpertKey

NEVER: Final[int] = sys.maxsize  # "next use" of a key that is never used again: infinity


class FutureAccesses:
    """A full access sequence with, for every index, where the same key is used next.

    Built once in O(n) and shared read-only: the simulator gives one per-layer policy instance
    per layer, and they can all use one ``FutureAccesses`` instead of rebuilding it.
    """

    def __init__(self, sequence: Sequence[ExpertKey]) -> None:
        self.keys: tuple[ExpertKey, ...] = tuple(sequence)
        next_use = [NEVER] * len(self.keys)
        seen: dict[ExpertKey, int] = {}
        for i in range(len(self.keys) - 1, -1, -1):
            key = self.keys[i]
            next_use[i] = seen.get(key, NEVER)
            seen[key] = i
        self.next_use: list[int] = next_use  # next_use[i]: next index > i with keys[i]
        self._positions: dict[ExpertKey, list[int]] | None = None  # built on first need

    def __len__(self) -> int:
        return len(self.keys)

    def first_use_from(self, key: ExpertKey, now: int) -> int:
        """The first index >= ``now`` at which ``key`` is used, or ``NEVER``."""
        if 0 <= now < len(self.keys) and self.keys[now] == key:
            return now  # the common case: the insert of a demand miss
        if self._positions is None:
            positions: dict[ExpertKey, list[int]] = {}
            for i, k in enumerate(self.keys):
                positions.setdefault(k, []).append(i)
            self._positions = positions
        where = self._positions.get(key, ())
        j = bisect_left(where, now)
        return where[j] if j < len(where) else NEVER


class BeladyPolicy(CachePolicy):
    """Evict the candidate used farthest in the future; never-used-again ties by smallest key.

    ``future`` is the complete sequence of accesses the pool will see (the flattened trace),
    and ``now`` must be the index into it: ``on_access(key, now)`` checks that
    ``future[now] == key`` and raises ``ValueError`` otherwise, since a misaligned clock would
    silently make the "optimal" numbers wrong. ``on_insert`` without an access (a prefetch)
    looks up the key's first use at or after ``now``.

    Each resident key's next use is stored when it is touched (an O(1) table lookup), so
    ``choose_victim`` is O(len(candidates)). Distinct keys never share a finite next use, so
    the only ties are keys never used again, broken by the smallest ``(layer, expert)``.
    """

    name: ClassVar[str] = "opt"

    def __init__(self, future: Sequence[ExpertKey] | FutureAccesses) -> None:
        self.future = future if isinstance(future, FutureAccesses) else FutureAccesses(future)
        self._next: dict[ExpertKey, int] = {}  # resident key -> index of its next use

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._next[key] = self.future.first_use_from(key, now)

    def on_access(self, key: ExpertKey, now: int) -> None:
        future = self.future
        if not 0 <= now < len(future.keys) or future.keys[now] != key:
            found = future.keys[now] if 0 <= now < len(future.keys) else "the end of the trace"
            raise ValueError(
                f"opt policy: access to {key} at now={now}, but its future sequence has {found} "
                "there; give BeladyPolicy the exact access sequence and now = index into it"
            )
        self._next[key] = future.next_use[now]

    def on_evict(self, key: ExpertKey) -> None:
        self._next.pop(key, None)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)
        nexts = self._next
        best: ExpertKey | None = None
        best_next = -1
        for key in candidates:
            nxt = nexts.get(key, -1)
            if nxt < now:  # unknown to the policy, or stale: look it up
                nxt = self.future.first_use_from(key, now)
            if best is None or nxt > best_next or (nxt == best_next and key < best):
                best, best_next = key, nxt
        assert best is not None  # candidates is not empty
        return best

    def reset(self) -> None:
        self._next.clear()

    def __repr__(self) -> str:
        return f"BeladyPolicy(future=<{len(self.future)} accesses>)"
