"""Static: a fixed set of "hot" experts is kept by preference; the rest are LRU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import ClassVar

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.keys import ExpertKey
from cache_policies.recency import Recency


class StaticPolicy(CachePolicy):
    """Evict non-hot candidates first, least recently used among them; hot ones only if needed.

    ``hot`` is chosen offline, e.g. the experts a recorded trace used most
    (``StaticPolicy.from_trace``). It is a *preference*, not a pin: when every candidate is hot
    the least recently used hot one goes, so a hot set larger than the pool still works. Ties
    cannot happen among resident keys (recency is the order of ``on_insert``/``on_access``
    calls); the key order breaks them for keys the policy never saw.
    """

    name: ClassVar[str] = "static"

    def __init__(self, hot: Iterable[ExpertKey] = ()) -> None:
        self.hot: frozenset[ExpertKey] = frozenset(ExpertKey(*k) for k in hot)
        self._recency = Recency()

    @classmethod
    def from_trace(cls, accesses: Iterable[ExpertKey], per_layer: int | None = None, *,
                   total: int | None = None) -> StaticPolicy:
        """Hot set = the ``per_layer`` most accessed experts of each layer, or the ``total``
        most accessed experts of all layers (one global pool); ties: the smaller key."""
        counts = Counter(accesses)
        if total is not None:
            return cls(key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                       [:total])
        if per_layer is None:
            raise ValueError("give per_layer or total")
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for key, n in counts.items():
            by_layer.setdefault(key.layer, []).append((-n, key.expert))
        hot = [
            ExpertKey(layer, expert)
            for layer, ranked in by_layer.items()
            for _, expert in sorted(ranked)[:per_layer]
        ]
        return cls(hot)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._recency.forget(key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)
        hot, last = self.hot, self._recency.ticks
        return min(candidates, key=lambda k: (k in hot, last.get(k, 0), k))

    def reset(self) -> None:
        self._recency.reset()

    def __repr__(self) -> str:
        return f"StaticPolicy(hot={sorted(self.hot)})"
