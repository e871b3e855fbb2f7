"""Miss-ratio curves: a policy's counts at every pool size from one pass over a trace.

``MissCurve`` keeps, per segment and layer, the sorted stack depths of the accesses
(``stack_distance``); the hits at a size are the depths at or under it. Exact for LRU and
Belady's MIN (``opt``) at every size from the largest step (``min_exact``) up to ``max_exact``
(None: no limit), with the simulator's semantics (step pins); ``result(size)`` is then equal to
``simulate``'s result, per layer and per segment. Smaller sizes split the trace's steps, so
callers simulate them instead.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from cache_policies.keys import ExpertKey
from cache_policies.simulator import SimResult
from cache_policies.stack_distance import largest_step, lru_depths, opt_depths

ONE_PASS = ("lru", "opt")  # policies with a one-pass curve


@dataclass(frozen=True)
class MissCurve:
    """Hits at any pool size in ``[min_exact, max_exact]`` from per-access stack depths."""

    policy: str
    per_layer: bool
    min_exact: int
    max_exact: int | None
    layers: tuple[int, ...]
    depths: dict[tuple[int, int], list[int]]  # (segment, layer) -> sorted depths, 0 dropped
    accesses: dict[tuple[int, int], int]  # (segment, layer) -> accesses
    segments: int

    def exact(self, size: int) -> bool:
        return size >= self.min_exact and (self.max_exact is None or size <= self.max_exact)

    def result(self, size: int) -> SimResult:
        """``simulate``'s result at ``size`` slots per pool (``ValueError`` if not exact)."""
        if not self.exact(size):
            raise ValueError(f"the {self.policy} curve is exact from {self.min_exact} to "
                             f"{self.max_exact or 'any'} slots, not at {size}")
        hits = {(s, layer): bisect_right(d, size) for (s, layer), d in self.depths.items()}
        layer_hits = dict.fromkeys(self.layers, 0)
        layer_misses = dict.fromkeys(self.layers, 0)
        seg_hits, seg_misses = [0] * self.segments, [0] * self.segments
        for (s, layer), n in self.accesses.items():
            h = hits.get((s, layer), 0)
            layer_hits[layer] += h
            layer_misses[layer] += n - h
            seg_hits[s] += h
            seg_misses[s] += n - h
        total_hits, total = sum(seg_hits), sum(self.accesses.values())
        return SimResult(total_hits, total - total_hits, total,
                         total_hits / total if total else 0.0, layer_hits, layer_misses, size,
                         self.per_layer, self.policy, tuple(seg_hits), tuple(seg_misses))

    def misses(self) -> dict[int, int]:
        """Misses at every exact size up to the size where nothing more is gained."""
        deepest = max((d[-1] for d in self.depths.values() if d), default=self.min_exact)
        top = deepest if self.max_exact is None else min(deepest, self.max_exact)
        total = sum(self.accesses.values())
        return {size: total - sum(bisect_right(d, size) for d in self.depths.values())
                for size in range(self.min_exact, max(top, self.min_exact) + 1)}


def miss_curve(steps: Sequence[Sequence[ExpertKey]], policy: str, *, per_layer: bool = True,
               segments: Sequence[int] | None = None, num_layers: int | None = None,
               max_size: int | None = None, depths: Sequence[int] | None = None) -> MissCurve:
    """The curve of ``policy`` ("lru" or "opt") over unsplit ``steps`` (``access_steps()``).

    ``segments``: consecutive step counts counted apart, as in ``simulate``; ``num_layers``:
    list every layer in results; ``max_size``: the largest size asked for (``opt`` is cheaper
    when its stack is cut there: exact up to it); ``depths``: ``lru_depths(steps,
    per_layer)`` when the caller has them already (LRU only)."""
    if policy not in ONE_PASS:
        raise ValueError(f"no one-pass curve for {policy!r}; policies with one: {ONE_PASS}")
    if depths is not None and policy != "lru":
        raise ValueError("depths are LRU's: give them only with policy='lru'")
    max_exact = max_size if policy == "opt" else None
    if depths is None:
        depths = lru_depths(steps, per_layer) if policy == "lru" else opt_depths(
            steps, per_layer, max_size)
    lengths = list(segments) if segments is not None else [len(steps)]
    by_cell: dict[tuple[int, int], list[int]] = {}
    accesses: dict[tuple[int, int], int] = {}
    layers: set[int] = set(range(num_layers or 0))
    index = 0
    step_iter = iter(steps)
    for seg, length in enumerate(lengths):
        for _ in range(length):
            for key in next(step_iter):
                cell = (seg, key[0])
                accesses[cell] = accesses.get(cell, 0) + 1
                if depths[index]:
                    by_cell.setdefault(cell, []).append(depths[index])
                index += 1
                layers.add(key[0])
    for d in by_cell.values():
        d.sort()
    smallest = max(1, largest_step(steps, per_layer))
    if max_exact is not None:
        max_exact = max(max_exact, smallest)
    return MissCurve(policy, per_layer, smallest, max_exact, tuple(sorted(layers)), by_cell,
                     accesses, len(lengths))
