"""Replay a ``Trace`` through one policy at one pool size, exactly as the runtime's cache would.

Without predictions or modelled prefetch ``replay`` *is* ``simulate`` on the trace's steps
(``Trace.access_steps``); otherwise a replay loop with the simulator's semantics adds two hooks
per record (one layer of one forward call):

* before the record's accesses, its recorded predictions go to every pool's policy through
  ``on_predict`` (the runtime calls ``ExpertCache.predict`` in ``on_route``, before acquiring);
* with ``prefetch=True``, after them, each predicted expert not resident is inserted
  (``on_insert``, no ``on_access``), evicting if needed but never one of the record's own experts
  (the runtime protects the current layer's experts from its prefetcher). This models a
  prefetch that always lands in time; a later use of the key is a hit. ``_admit`` decides
  whether a predicted key is loaded at all (always, here; ``prefetch_reference`` overrides it).

Hits and misses are also counted per segment (each sequence's prefill and decode,
``cache_policies.segments``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cache_policies.base import CachePolicy
from cache_policies.capacity import Capacity, check_capacity, pool_size
from cache_policies.keys import ExpertKey
from cache_policies.policy_errors import build, raised_in
from cache_policies.segments import Segment, segment_steps, trace_segments
from cache_policies.simulator import (
    SegmentCounter,
    SimResult,
    _Evictable,
    _result,
    evict,
    simulate,
)
from cache_policies.trace import Record, Trace

Pool = tuple[dict[ExpertKey, None], CachePolicy, list[int]]  # resident, policy, [hits, misses]


@dataclass(frozen=True)
class ReplayResult:
    """A simulation's counts plus what the modelled prefetcher did."""

    sim: SimResult
    prefetch_inserts: int = 0
    prefetch_useful: int = 0  # prefetched keys used before their eviction
    prefetch_wasted: int = 0  # prefetched keys evicted unused


def replay(trace: Trace, policy_factory: Callable[[], CachePolicy], capacity: Capacity, *,
           per_layer: bool = True, predictions: bool = True, prefetch: bool = False,
           segments: Sequence[Segment] | None = None) -> ReplayResult:
    """Replay ``trace`` through pools of ``capacity`` slots (per layer, or one global pool;
    a sequence: layer l's pool of ``capacity[l]``, per-layer pools only).

    Groups are split at ``capacity`` keys, as the runtime's ``max_group`` is its pool capacity,
    and a group's keys are pinned together while it is acquired. ``predictions``: feed the
    recorded predictions to policies that use them; ``prefetch``: model the prefetcher.
    ``segments``: ``trace_segments(trace)``, computed when not given; the result counts hits
    and misses per segment.
    """
    segments = trace_segments(trace) if segments is None else segments
    num_layers = trace.header.num_layers
    capacity = check_capacity(capacity, per_layer, num_layers)  # before the steps index it
    hooks = prefetch or (predictions and trace.has_predictions and _uses_predictions(
        policy_factory))
    if not hooks:
        return ReplayResult(simulate(trace.access_steps(capacity), policy_factory, capacity,
                                     per_layer=per_layer, num_layers=num_layers,
                                     segments=segment_steps(trace, segments, capacity)))
    return _Replayer(policy_factory, capacity, per_layer, num_layers).run(
        trace.records, predictions, prefetch, [s.records for s in segments])


def _uses_predictions(policy_factory: Callable[[], CachePolicy]) -> bool:
    return type(build(policy_factory)).on_predict is not CachePolicy.on_predict


class _Replayer:
    """The simulator's loop with prediction and prefetch hooks between records."""

    def __init__(self, factory: Callable[[], CachePolicy], capacity: int | tuple[int, ...],
                 per_layer: bool, num_layers: int) -> None:
        shared = None if per_layer else ({}, build(factory))
        self.pools: dict[int, Pool] = {}
        for layer in range(num_layers):
            resident, policy = shared if shared is not None else ({}, build(factory))
            self.pools[layer] = (resident, policy, [0, 0])
        self.capacity, self.per_layer, self.shared = capacity, per_layer, shared
        self.now = 0
        self.view = _Evictable()
        self.prefetched: set[ExpertKey] = set()
        self.inserts = self.useful = self.wasted = 0

    def run(self, records: Sequence[Record], predictions: bool, prefetch: bool,
            segments: Sequence[int] | None = None) -> ReplayResult:
        """``segments``: numbers of consecutive records counted apart (None: not counted)."""
        counter = SegmentCounter(self.pools)
        ends = _ends(segments if segments is not None else ())
        for index, record in enumerate(records, start=1):
            if predictions and record.predicted:
                self._predict(prediction_scores(record))
            for group in record.groups(self.capacity):
                for key in group:
                    self._access(key, group)
            if prefetch and record.predicted:
                protected = frozenset(ExpertKey(record.layer, e) for e in record.used())
                for p in record.predicted:
                    for e in p.experts:
                        self._prefetch(ExpertKey(p.layer, e), protected)
            while ends and ends[-1] == index:
                ends.pop()
                counter.cut(self.now)
        sim = _result(self.pools, self.now, self.capacity, self.per_layer, self.shared)
        if segments is not None:
            sim = counter.result(sim)
        return ReplayResult(sim, self.inserts, self.useful, self.wasted)

    def _predict(self, scores: dict[ExpertKey, float]) -> None:
        """Every pool's policy hears the predictions, as in ``ExpertCache.predict``; a per-layer
        pool only those of its own layer (the only keys it can rank: 32x less work)."""
        if not self.per_layer:
            self._hook(self.shared[1], "on_predict", scores)  # type: ignore[index]
            return
        by_layer: dict[int, dict[ExpertKey, float]] = {}
        for key, prob in scores.items():
            by_layer.setdefault(key.layer, {})[key] = prob
        for layer, part in by_layer.items():
            self._hook(self.pools[layer][1], "on_predict", part)

    def _hook(self, policy: CachePolicy, hook: str, *args: object) -> None:
        """``policy.<hook>(*args, now)``; ``PolicyHookError`` naming both on a raise."""
        try:
            getattr(policy, hook)(*args, self.now)
        except Exception as exc:
            raise raised_in(policy, hook, (*args, self.now), self.now, exc) from exc

    def _access(self, key: ExpertKey, pinned: Sequence[ExpertKey]) -> None:
        resident, policy, counts = self.pools[key.layer]
        if key in resident:
            counts[0] += 1
            if key in self.prefetched:
                self.prefetched.discard(key)
                self.useful += 1
        else:
            counts[1] += 1
            if not self._make_room(resident, policy, pinned, key.layer):
                raise ValueError(f"access {self.now}: no evictable slot for {key} "
                                 f"(capacity={pool_size(self.capacity, key.layer)})")
            resident[key] = None
            self._hook(policy, "on_insert", key)
        try:  # inline, not _hook: once per access
            policy.on_access(key, self.now)
        except Exception as exc:
            raise raised_in(policy, "on_access", (key, self.now), self.now, exc) from exc
        self.now += 1

    def _prefetch(self, key: ExpertKey, protected: frozenset[ExpertKey]) -> None:
        resident, policy, _ = self.pools[key.layer]
        if key in resident or not self._admit(key, resident, policy, protected):
            return
        if not self._make_room(resident, policy, protected, key.layer):
            return  # nothing may go: the runtime's prefetcher gives up too
        resident[key] = None
        self._hook(policy, "on_insert", key)
        self.prefetched.add(key)
        self.inserts += 1

    def _admit(self, key: ExpertKey, resident: dict[ExpertKey, None], policy: CachePolicy,
               protected: frozenset[ExpertKey]) -> bool:
        """Whether to load the predicted, absent ``key``: the runtime's prefetcher always does."""
        del key, resident, policy, protected
        return True

    def _make_room(self, resident: dict[ExpertKey, None], policy: CachePolicy,
                   keep: Sequence[ExpertKey] | frozenset[ExpertKey], layer: int) -> bool:
        """Whether ``layer``'s pool has or made (by an eviction) room for one more key."""
        if len(resident) < pool_size(self.capacity, layer):
            return True
        view = self.view
        view.resident, view.pinned = resident, keep  # type: ignore[assignment]
        if not view:
            return False
        victim = evict(policy, view, self.now)
        if victim in self.prefetched:
            self.prefetched.discard(victim)
            self.wasted += 1
        return True


def prediction_scores(record: Record) -> dict[ExpertKey, float]:
    """A record's predictions as ``on_predict`` scores: the recorded probabilities over all
    experts of each predicted layer, or 1.0 for each predicted expert when none were kept."""
    scores: dict[ExpertKey, float] = {}
    for p in record.predicted:
        if p.probs:
            scores.update((ExpertKey(p.layer, e), prob) for e, prob in enumerate(p.probs))
        else:
            scores.update((ExpertKey(p.layer, e), 1.0) for e in p.experts)
    return scores


def _ends(lengths: Sequence[int]) -> list[int]:
    """Cumulative ends of consecutive runs, last first (popped as the replay reaches them)."""
    ends, total = [], 0
    for length in lengths:
        total += length
        ends.append(total)
    return ends[::-1]
