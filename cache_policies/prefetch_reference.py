"""``opt+prefetch``: the fewest demand misses when every predicted expert may be loaded for free.

With modelled prefetch (``replay(..., prefetch=True)``) a policy's hit rate can exceed ``opt``'s:
``opt`` is the demand-paging optimum, and a prefetched expert's load is not a miss (it costs
bytes: MB/token counts it). The fair reference is the optimum of a relaxed problem: wherever the
modelled prefetcher acts (after each record with predictions, in the order it would), each
predicted expert *may* be loaded at no cost, evicting any resident expert of its pool. Demand
accesses are as in ``simulate`` (a step's keys pinned). Every policy under the modelled
prefetch is one strategy of this problem (it loads every predicted expert it has room for, and
may not evict the current layer's experts: a restriction the relaxation drops), so no policy
has fewer demand misses: the reference bounds every ``--prefetch`` row.

Its optimum is Belady's rule on *events*. A demand use at ``t`` hits only if its key stayed
resident since the key's previous event (use or free-load chance) ``e``: the use needs the
interval ``[e, t]``, and packing the most such intervals in the pool is what MIN solves, greedily
by their ends (Belady 1966; Mattson et al. 1970). So a resident key's priority is its next use,
unless a free-load chance for it comes first: then it can go at no cost (priority: never).
Misses evict the lowest priority; a free chance loads the key if its next event is a use and a
slot is free or that use comes before the lowest priority's. ``tests/test_prefetch_reference.py``
checks it against an exhaustive search over every load and eviction choice on small traces.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import ClassVar

from cache_policies.base import CachePolicy, require_candidates
from cache_policies.capacity import pool_size
from cache_policies.keys import ExpertKey
from cache_policies.replay import ReplayResult, _Replayer
from cache_policies.segments import Segment, trace_segments
from cache_policies.trace import Trace

NAME = "opt+prefetch"
_NEVER = 1 << 62


def prefetch_reference(trace: Trace, capacity: int, *, per_layer: bool = True,
                       segments: Sequence[Segment] | None = None) -> ReplayResult:
    """The relaxed optimum above for ``trace`` at ``capacity`` slots per pool: ``replay``'s
    counts, per segment too, and how many free loads it made (``prefetch_inserts``)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    segments = trace_segments(trace) if segments is None else segments
    timeline = Timeline(trace, capacity)
    replayer = _FreeLoads(lambda: FreeLoadPolicy(timeline), capacity, per_layer,
                          trace.header.num_layers, timeline)
    return replayer.run(trace.records, predictions=False, prefetch=True,
                        segments=[s.records for s in segments])


class Timeline:
    """Every event of the replay in order (each access, then each free-load chance of a record's
    predictions), per key: positions of its uses and of its chances. ``clock``: the event now."""

    def __init__(self, trace: Trace, capacity: int) -> None:
        self.uses: dict[ExpertKey, list[int]] = {}
        self.chances: dict[ExpertKey, list[int]] = {}
        position = 0
        for record in trace.records:
            for group in record.groups(capacity):
                for key in group:
                    self.uses.setdefault(key, []).append(position)
                    position += 1
            for p in record.predicted:
                for e in p.experts:
                    self.chances.setdefault(ExpertKey(p.layer, e), []).append(position)
                    position += 1
        self.clock = -1

    def next_use(self, key: ExpertKey) -> int:
        return _after(self.uses.get(key, ()), self.clock)

    def priority(self, key: ExpertKey) -> int:
        """When ``key`` is needed next if resident from now on: its next use, or never when a
        free-load chance comes first."""
        use = self.next_use(key)
        return _NEVER if _after(self.chances.get(key, ()), self.clock) < use else use


def _after(positions: Sequence[int], clock: int) -> int:
    i = bisect_right(positions, clock)
    return positions[i] if i < len(positions) else _NEVER


class FreeLoadPolicy(CachePolicy):
    """Evicts the candidate of lowest ``Timeline.priority`` (ties: the smallest key)."""

    name: ClassVar[str] = NAME

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    def on_insert(self, key: ExpertKey, now: int) -> None:
        pass

    def on_access(self, key: ExpertKey, now: int) -> None:
        pass

    def on_evict(self, key: ExpertKey) -> None:
        pass

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)
        priority = self.timeline.priority
        return max(candidates, key=lambda k: (priority(k), -k[0], -k[1]))

    def reset(self) -> None:
        pass


class _FreeLoads(_Replayer):
    """The replay loop on the timeline's clock, loading a chance's key only when MIN would."""

    def __init__(self, factory: object, capacity: int, per_layer: bool, num_layers: int,
                 timeline: Timeline) -> None:
        super().__init__(factory, capacity, per_layer, num_layers)  # type: ignore[arg-type]
        self.timeline = timeline

    def _access(self, key: ExpertKey, pinned: Sequence[ExpertKey]) -> None:
        self.timeline.clock += 1
        super()._access(key, pinned)

    def _prefetch(self, key: ExpertKey, protected: frozenset[ExpertKey]) -> None:
        self.timeline.clock += 1
        super()._prefetch(key, frozenset())  # the relaxation: any resident key may go

    def _admit(self, key: ExpertKey, resident: dict[ExpertKey, None], policy: CachePolicy,
               protected: frozenset[ExpertKey]) -> bool:
        use = self.timeline.priority(key)
        if use == _NEVER:
            return False  # never used again, or a later chance loads it just as well
        if len(resident) < pool_size(self.capacity, key.layer):
            return True
        victim = policy.choose_victim(list(resident), self.now)
        return use < self.timeline.priority(victim)
