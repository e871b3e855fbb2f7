"""Router-predicted: keep the experts the router expects the next layers to need."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.keys import ExpertKey
from cache_policies.recency import Recency


class RouterPolicy(CachePolicy):
    """Evict the candidate with the lowest latest predicted probability; ties by LRU, then key.

    The runtime applies layer l+1's gate (and further ones) to the hidden state available at
    layer l and reports the probabilities through ``on_predict``. A prediction for a layer
    *replaces* the previous prediction for that layer: experts of that layer missing from the
    new ``scores`` drop to 0, as do experts of layers never predicted. Passing the full softmax
    over a layer's experts, or only its top-k, both work; layers absent from ``scores`` keep
    their earlier prediction, because a prediction stays the best guess until a newer one
    arrives (the next token's prediction for a layer lands before that layer runs again).

    Without any predictions every score is 0 and this is exactly LRU, which is also what
    decides among experts with equal predictions. Recency is the order of
    ``on_insert``/``on_access`` calls (a private tick), as in ``LRUPolicy``.
    """

    name: ClassVar[str] = "router"

    def __init__(self) -> None:
        self._predicted: dict[int, dict[int, float]] = {}  # layer -> expert -> probability
        self._recency = Recency()

    def on_predict(self, scores: Mapping[ExpertKey, float], now: int) -> None:
        fresh: dict[int, dict[int, float]] = {}
        for key, prob in scores.items():
            fresh.setdefault(key.layer, {})[key.expert] = float(prob)
        self._predicted.update(fresh)

    def predicted(self, key: ExpertKey) -> float:
        """The latest predicted probability of ``key`` (0 when its layer's prediction lacks it)."""
        return self._predicted.get(key.layer, {}).get(key.expert, 0.0)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._recency.forget(key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)
        last = self._recency.ticks
        return min(candidates, key=lambda k: (self.predicted(k), last.get(k, 0), k))

    def reset(self) -> None:
        self._predicted.clear()
        self._recency.reset()
