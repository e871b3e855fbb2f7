"""What a trace says about locality, before any policy: reuse, popularity, sharing, curves.

* **Reuse distance** of an access: the number of distinct other experts of its pool used since
  the same expert's previous use (its LRU stack depth minus one, taken at its step's start:
  ``stack_distance``). LRU with ``c`` slots per pool hits exactly the reuses at distance < c.
* **Miss-ratio curves**: LRU's and Belady's (``opt``) misses by pool size, for per-layer pools
  and for one global pool: from one pass (``miss_curve``) at every size from the largest step
  (the most distinct experts one forward call acquires from a pool: with a prefill chunk, often
  every expert of a layer) up; below it, down to top_k, where the runtime splits such a call
  into groups the pool can pin (so each size replays another access sequence), simulated at
  up to ``SIMULATED_SIZES`` sizes spread evenly on a log scale.
* **Popularity**, per layer: the share of the tokens' top-k picks each expert gets, the spread
  (smallest and largest share; uniform is 1/E) and the normalised entropy (1: uniform).
* **Sharing**, per layer: the fraction of consecutive tokens of a sequence that share at least
  one expert at that layer (the model card's "consecutive tokens sharing an expert"), and the
  same for independent uniform top-k picks, ``1 - C(E-k, k) / C(E, k)``.
* **Predictions**: ``prediction_stats``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass

from cache_policies.belady import BeladyPolicy, FutureAccesses
from cache_policies.keys import ExpertKey
from cache_policies.lru import LRUPolicy
from cache_policies.miss_curve import miss_curve
from cache_policies.prediction_stats import PredictionStats, prediction_stats
from cache_policies.simulator import flatten, simulate
from cache_policies.stack_distance import lru_depths
from cache_policies.trace import Trace

QUANTILES = (0.5, 0.9, 0.99)
SIMULATED_SIZES = 8  # sizes simulated per layout below the one-pass curves' exact range


@dataclass(frozen=True)
class ReuseStats:
    """Reuse distances and miss-ratio curves of one pool layout ("layer" or "global")."""

    pool: str
    accesses: int
    first_uses: int  # accesses to an expert not used before in the trace (cold)
    histogram: dict[int, int]  # bucket [b, 2b) (0 and 1 alone) -> reuses
    quantiles: dict[str, int]  # "p50", "p90", "p99" of the reuse distance
    lru_misses: dict[int, int]  # slots per pool -> misses
    opt_misses: dict[int, int]
    simulated: tuple[int, ...] = ()  # the sizes simulated (below the one-pass exact range)


@dataclass(frozen=True)
class LayerStats:
    """Popularity and sharing at one layer."""

    layer: int
    tokens: int
    picks: tuple[int, ...]  # per expert: tokens that picked it
    entropy: float  # of the pick shares, / log(E): 1 = uniform
    sharing: float | None  # consecutive tokens sharing >= 1 expert (None: no pair)
    sharing_uniform: float  # the same for independent uniform top-k picks

    def shares(self) -> list[float]:
        total = sum(self.picks)
        return [p / total if total else 0.0 for p in self.picks]


@dataclass(frozen=True)
class TraceStats:
    reuse: tuple[ReuseStats, ...]
    layers: tuple[LayerStats, ...]
    predictions: PredictionStats
    top_k: int
    num_experts: int


def trace_stats(trace: Trace) -> TraceStats:
    """Every statistic above for ``trace`` (both pool layouts)."""
    reuse = tuple(reuse_stats(trace, per_layer) for per_layer in (True, False))
    return TraceStats(reuse, layer_stats(trace), prediction_stats(trace), trace.header.top_k,
                      trace.header.num_experts)


def reuse_stats(trace: Trace, per_layer: bool) -> ReuseStats:
    steps = trace.access_steps()
    depths = lru_depths(steps, per_layer)
    reuses = sorted(d - 1 for d in depths if d)
    histogram: Counter[int] = Counter(0 if r == 0 else 1 << (r.bit_length() - 1) for r in reuses)
    quantiles = {f"p{round(q * 100)}": reuses[min(len(reuses) - 1, math.ceil(q * len(reuses)) - 1)]
                 for q in QUANTILES} if reuses else {}
    curves, simulated = _curves(trace, steps, depths, per_layer)
    return ReuseStats("layer" if per_layer else "global", len(depths),
                      sum(1 for d in depths if not d), dict(sorted(histogram.items())), quantiles,
                      curves["lru"], curves["opt"], tuple(simulated))


def _curves(trace: Trace, steps: list[list[ExpertKey]], lru: list[int], per_layer: bool
            ) -> tuple[dict[str, dict[int, int]], list[int]]:
    """Misses by size of LRU and opt (one pass, simulated below its exact range), and the
    sizes simulated. ``lru``: the LRU depths of ``steps``."""
    curves = {"lru": miss_curve(steps, "lru", per_layer=per_layer, depths=lru).misses(),
              "opt": miss_curve(steps, "opt", per_layer=per_layer).misses()}
    smallest = min(curves["lru"], default=trace.header.top_k)
    simulated = spread(range(trace.header.top_k, smallest), SIMULATED_SIZES)
    future = FutureAccesses(flatten(steps))  # the same at every size: groups keep the order
    for size in simulated:
        split = trace.access_steps(size)
        curves["lru"][size] = simulate(split, LRUPolicy, size, per_layer=per_layer).misses
        curves["opt"][size] = simulate(split, lambda: BeladyPolicy(future), size,
                                       per_layer=per_layer).misses
    return {name: dict(sorted(c.items())) for name, c in curves.items()}, simulated


def spread(sizes: range, most: int) -> list[int]:
    """All of ``sizes``, or ``most`` of them spread evenly on a log scale, ends included."""
    if len(sizes) <= most:
        return list(sizes)
    first, last = sizes[0], sizes[-1]
    ratio = (last / first) ** (1 / (most - 1))
    return sorted({min(last, max(first, round(first * ratio ** i))) for i in range(most)})


def layer_stats(trace: Trace) -> tuple[LayerStats, ...]:
    h = trace.header
    picks = [[0] * h.num_experts for _ in range(h.num_layers)]
    shared, pairs = [0] * h.num_layers, [0] * h.num_layers
    previous: dict[tuple[int, int], frozenset[int]] = {}
    for record in trace.records:
        row_picks = picks[record.layer]
        for token in record.experts:
            chosen = frozenset(token)
            for e in chosen:
                row_picks[e] += 1
            before = previous.get((record.seq, record.layer))
            if before is not None:
                pairs[record.layer] += 1
                shared[record.layer] += bool(before & chosen)
            previous[(record.seq, record.layer)] = chosen
    uniform = _uniform_sharing(h.num_experts, h.top_k)
    return tuple(LayerStats(layer, sum(p) // max(1, h.top_k), tuple(p), _entropy(p),
                            shared[layer] / pairs[layer] if pairs[layer] else None, uniform)
                 for layer, p in enumerate(picks))


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in counts if c)
    return h / math.log(len(counts))


def _uniform_sharing(experts: int, k: int) -> float:
    """P(two independent uniform k-subsets of E experts intersect) = 1 - C(E-k, k) / C(E, k)."""
    return 1.0 - math.comb(experts - k, k) / math.comb(experts, k) if k <= experts else 1.0


def hit_rate_at(stats: ReuseStats, slots: int, curve: str = "lru") -> float | None:
    """Hit rate of ``curve`` ("lru"/"opt") at ``slots`` per pool, from the stored curve."""
    misses = stats.lru_misses if curve == "lru" else stats.opt_misses
    if not misses or not stats.accesses:
        return None
    sizes = sorted(misses)
    size = sizes[max(0, min(len(sizes) - 1, bisect_right(sizes, slots) - 1))]
    return 1 - misses[size] / stats.accesses
