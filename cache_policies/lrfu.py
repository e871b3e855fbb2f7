"""LRFU: one score that slides from LFU to LRU with a single decay parameter.

Lee et al., "LRFU: A Spectrum of Policies that Subsumes the LRU and LFU Policies" (IEEE ToC,
2001). Each past access at time ``t`` contributes ``0.5 ** (decay * (now - t))`` to the key's
combined recency-frequency score::

    CRF(key, now) = sum over accesses t of key: 0.5 ** (decay * (now - t))

``decay = 0`` counts accesses (LFU); large values let the latest access dominate (LRU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.keys import ExpertKey
from cache_policies.recency import Recency

# Half-life of an access = 1 / decay accesses of the pool's clock. Mixtral 8x7B makes 64 expert
# accesses per token (32 layers x top-2), so 1e-3 halves an access's weight after ~16 tokens:
# long enough to see which experts the router favours, short enough to follow a topic change.
DEFAULT_DECAY = 1e-3


class LRFUPolicy(CachePolicy):
    """Evict the candidate with the lowest CRF; ties by recency (oldest first), then key.

    The sum is kept incrementally and in log2 space, per key, as ``(log2 CRF at t_last,
    t_last)``: an access at ``now`` gives ``CRF = 1 + CRF_last * 2 ** (-decay * (now - t_last))``
    and comparing at ``now`` needs only ``log2 CRF_last - decay * (now - t_last)``. Working in
    logs means long gaps lose nothing to underflow (``0.5 ** x`` would be 0 for every key idle
    more than ~1074 / decay accesses, making them all tie).

    Like LFU, only ``on_access`` adds to the score and the score persists across evictions, so
    a returning expert keeps its (decayed) history. A prefetched key that was never accessed
    scores as having CRF 0 and goes first.
    """

    name: ClassVar[str] = "lrfu"

    def __init__(self, decay: float = DEFAULT_DECAY) -> None:
        if not decay >= 0.0 or math.isinf(decay):
            raise ValueError(f"LRFU decay must be a finite number >= 0, got {decay!r}")
        self.decay = decay
        self._log_crf: dict[ExpertKey, float] = {}  # log2 CRF as of the key's last access
        self._t_last: dict[ExpertKey, int] = {}  # clock of the key's last access
        self._recency = Recency()  # tie-break

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._recency.touch(key)
        log_crf = self._log_crf.get(key)
        if log_crf is None:
            self._log_crf[key] = 0.0  # log2(1): the first access
        else:
            decayed = log_crf - self.decay * (now - self._t_last[key])
            self._log_crf[key] = math.log2(1.0 + 2.0**decayed)
        self._t_last[key] = now

    def on_evict(self, key: ExpertKey) -> None:
        self._recency.forget(key)

    def score(self, key: ExpertKey, now: int) -> float:
        """log2 CRF(key, now); ``-inf`` for a key never accessed."""
        log_crf = self._log_crf.get(key)
        if log_crf is None:
            return -math.inf
        return log_crf - self.decay * (now - self._t_last[key])

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)
        recency = self._recency.ticks
        return min(candidates, key=lambda k: (self.score(k, now), recency.get(k, 0), k))

    def reset(self) -> None:
        self._log_crf.clear()
        self._t_last.clear()
        self._recency.reset()

    def __repr__(self) -> str:
        return f"LRFUPolicy(decay={self.decay})"
