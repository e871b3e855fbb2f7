"""Replay an expert-access trace through a policy at a given capacity, as the runtime would.

A trace is a sequence of *steps*; a step is the experts one layer needs at once (the top-k of
one token at one layer). The simulator mirrors the expert cache exactly, so its counts equal
the runtime's for the same trace, policy and capacity:

    for each step: pin the step's keys (all of them, for the whole step)
        for each key of the step, in order (``now`` = global index of this access):
            resident -> hit: ``on_access(key, now)``
            else     -> miss: if the pool is full,
                            victim = choose_victim(resident keys not pinned, now); on_evict(victim)
                        on_insert(key, now); on_access(key, now)

``now`` counts every key of every step (0, 1, 2, ...), so ``BeladyPolicy`` can be given the
flattened trace (``flatten(accesses)``). Pure Python, no numpy: the hot loop is a dict lookup
and one policy call per hit; a full-pool miss passes a reused live view of the candidates
instead of building a list, so nothing is allocated per access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import overload

from cache_policies.base import CachePolicy
from cache_policies.capacity import Capacity, check_capacity, check_steps_fit
from cache_policies.keys import ExpertKey
from cache_policies.policy_errors import bad_victim, build, raised_in

PolicyFactory = Callable[[], CachePolicy]


@dataclass(frozen=True)
class SimResult:
    """Counts of one simulation; per-layer dicts are keyed by layer index."""

    hits: int
    misses: int
    accesses: int
    hit_rate: float  # hits / accesses, 0.0 for an empty trace
    layer_hits: dict[int, int]
    layer_misses: dict[int, int]
    capacity: int  # slots per pool: per layer when per_layer (the smallest), else in total
    per_layer: bool
    policy: str  # the policy's name
    # Per segment (consecutive runs of steps given to ``simulate``), in order; () = not asked.
    segment_hits: tuple[int, ...] = ()
    segment_misses: tuple[int, ...] = ()
    capacities: tuple[int, ...] = ()  # each layer's pool when they differ; () = all ``capacity``


class _Evictable(Sequence[ExpertKey]):
    """The candidates of a miss, as a live view: resident keys that the current step does not pin.

    Building a list per miss costs O(pool size) even when the policy only looks at the oldest
    key or two (LRU), which dominates with large global pools. The view answers ``in`` in O(1)
    and iterates lazily; the simulator re-aims one instance at each miss, which is safe because
    the contract forbids a policy to keep ``candidates`` after ``choose_victim`` returns.
    """

    __slots__ = ("pinned", "resident")

    def __init__(self) -> None:
        self.resident: dict[ExpertKey, None] = {}
        self.pinned: Sequence[ExpertKey] = ()

    def __contains__(self, key: object) -> bool:
        return key in self.resident and key not in self.pinned

    def __iter__(self) -> Iterator[ExpertKey]:
        pinned = self.pinned
        return (k for k in self.resident if k not in pinned)

    def __bool__(self) -> bool:  # cheaper than __len__: stops at the first candidate
        pinned = self.pinned
        for k in self.resident:
            if k not in pinned:
                return True
        return False

    def __len__(self) -> int:
        return len(self.resident) - sum(1 for k in set(self.pinned) if k in self.resident)

    @overload
    def __getitem__(self, index: int) -> ExpertKey: ...
    @overload
    def __getitem__(self, index: slice) -> list[ExpertKey]: ...
    def __getitem__(self, index: int | slice) -> ExpertKey | list[ExpertKey]:
        return list(self)[index]  # O(n); policies normally iterate instead


def flatten(accesses: Sequence[Sequence[ExpertKey]]) -> list[ExpertKey]:
    """The trace as one access sequence, index = the simulator's ``now`` (for ``opt``)."""
    return [key for step in accesses for key in step]


def simulate(
    accesses: Sequence[Sequence[ExpertKey]],
    policy_factory: PolicyFactory,
    capacity: Capacity,
    *,
    per_layer: bool = True,
    num_layers: int | None = None,
    segments: Sequence[int] | None = None,
) -> SimResult:
    """Replay ``accesses`` through pools of ``capacity`` slots, one policy instance per pool.

    ``per_layer``: one pool (and one ``policy_factory()`` instance) per layer, each of
    ``capacity`` slots (or layer l's pool of ``capacity[l]``: ``check_capacity``), as when
    every layer has its own slot budget; otherwise one global pool.
    ``num_layers``: when given, keys must have ``0 <= layer < num_layers`` and the per-layer
    dicts list every layer, used or not.
    ``segments``: numbers of consecutive steps (summing to ``len(accesses)``) whose hits and
    misses are also counted apart (``SimResult.segment_hits``/``segment_misses``), e.g. each
    sequence's prefill and decode (``cache_policies.segments``).
    Raises ``ValueError`` if ``capacity`` is below 1 or below the number of distinct keys a step
    needs from one pool (they are all pinned at once, so they must fit together), and
    ``PolicyHookError`` naming the policy class and hook when the policy raises (its own
    exception chained) or chooses a victim that is not a candidate.
    """
    capacity = check_capacity(capacity, per_layer, num_layers)
    if num_layers is None and not isinstance(capacity, int):
        num_layers = len(capacity)  # a key of another layer has no pool size: refused
    check_steps_fit(accesses, capacity, per_layer)
    shared: tuple[dict[ExpertKey, None], CachePolicy] | None = None
    if not per_layer:
        shared = ({}, build(policy_factory))
    # layer -> (resident keys of its pool, the pool's policy, [hits, misses] of this layer)
    pools: dict[int, tuple[dict[ExpertKey, None], CachePolicy, list[int]]] = {}

    def add_layer(layer: int) -> tuple[dict[ExpertKey, None], CachePolicy, list[int]]:
        if num_layers is not None and not 0 <= layer < num_layers:
            raise ValueError(f"trace has layer {layer}, outside num_layers={num_layers}")
        resident, policy = shared if shared is not None else ({}, build(policy_factory))
        pools[layer] = (resident, policy, [0, 0])
        return pools[layer]

    for layer in range(num_layers or 0):
        add_layer(layer)
    if segments is None:
        now = _replay(accesses, pools, add_layer, capacity)
        return _result(pools, now, capacity, per_layer, shared)
    if sum(segments) != len(accesses) or min(segments, default=0) < 0:
        raise ValueError(f"segments must be step counts summing to {len(accesses)} steps, got "
                         f"{sum(segments)}")
    now, start, counts = 0, 0, SegmentCounter(pools)
    for length in segments:
        now = _replay(accesses[start:start + length], pools, add_layer, capacity, now)
        counts.cut(now)
        start += length
    return counts.result(_result(pools, now, capacity, per_layer, shared))


class SegmentCounter:
    """Hits and misses per segment, from the pools' running totals at each segment's end."""

    def __init__(self, pools: dict[int, tuple[dict[ExpertKey, None], CachePolicy, list[int]]]
                 ) -> None:
        self.pools = pools
        self.hits: list[int] = []
        self.misses: list[int] = []
        self._hits = self._accesses = 0

    def cut(self, accesses: int) -> None:
        """A segment ended after ``accesses`` accesses in all."""
        hits = sum(counts[0] for _, _, counts in self.pools.values())
        self.hits.append(hits - self._hits)
        self.misses.append(accesses - self._accesses - (hits - self._hits))
        self._hits, self._accesses = hits, accesses

    def result(self, total: SimResult) -> SimResult:
        return replace(total, segment_hits=tuple(self.hits), segment_misses=tuple(self.misses))


def _replay(
    accesses: Sequence[Sequence[ExpertKey]],
    pools: dict[int, tuple[dict[ExpertKey, None], CachePolicy, list[int]]],
    add_layer: Callable[[int], tuple[dict[ExpertKey, None], CachePolicy, list[int]]],
    capacity: int | tuple[int, ...],
    now: int = 0,
) -> int:
    """The hot loop from access ``now`` on; returns the number of accesses replayed by its end.
    Kept flat on purpose: speed."""
    candidates = _Evictable()
    for step in accesses:
        for key in step:
            try:
                resident, policy, counts = pools[key[0]]
            except KeyError:
                resident, policy, counts = add_layer(key[0])
            if key in resident:
                counts[0] += 1
                try:
                    policy.on_access(key, now)
                except Exception as exc:
                    raise raised_in(policy, "on_access", (key, now), now, exc) from exc
            else:
                counts[1] += 1
                full = capacity if type(capacity) is int else capacity[key[0]]
                if len(resident) >= full:  # inlined evict(): this loop is the hot path
                    candidates.resident = resident
                    candidates.pinned = step
                    try:
                        victim = policy.choose_victim(candidates, now)
                    except Exception as exc:
                        raise raised_in(policy, "choose_victim", (now,), now, exc) from exc
                    try:
                        evictable = victim in resident and victim not in step
                    except TypeError:  # unhashable: not a key at all
                        evictable = False
                    if not evictable:
                        raise bad_victim(policy, victim, candidates, now)
                    del resident[victim]
                    try:
                        policy.on_evict(victim)
                    except Exception as exc:
                        raise raised_in(policy, "on_evict", (victim,), now, exc) from exc
                resident[key] = None
                try:
                    policy.on_insert(key, now)
                except Exception as exc:
                    raise raised_in(policy, "on_insert", (key, now), now, exc) from exc
                try:
                    policy.on_access(key, now)
                except Exception as exc:
                    raise raised_in(policy, "on_access", (key, now), now, exc) from exc
            now += 1
    return now


def evict(policy: CachePolicy, candidates: _Evictable, now: int) -> ExpertKey:
    """Ask ``policy`` for a victim among ``candidates``, drop it from their pool (``on_evict``)
    and return it. ``PolicyHookError`` when the policy raises or names a key that is not a
    candidate."""
    try:
        victim = policy.choose_victim(candidates, now)
    except Exception as exc:
        raise raised_in(policy, "choose_victim", (now,), now, exc) from exc
    try:
        evictable = victim in candidates
    except TypeError:  # unhashable: not a key at all
        evictable = False
    if not evictable:
        raise bad_victim(policy, victim, candidates, now)
    del candidates.resident[victim]
    try:
        policy.on_evict(victim)
    except Exception as exc:
        raise raised_in(policy, "on_evict", (victim,), now, exc) from exc
    return victim


def _result(
    pools: dict[int, tuple[dict[ExpertKey, None], CachePolicy, list[int]]],
    accesses: int,
    capacity: int | Sequence[int],
    per_layer: bool,
    shared: tuple[dict[ExpertKey, None], CachePolicy] | None,
) -> SimResult:
    layer_hits = {layer: pools[layer][2][0] for layer in sorted(pools)}
    layer_misses = {layer: pools[layer][2][1] for layer in sorted(pools)}
    hits = sum(layer_hits.values())
    any_policy = shared[1] if shared else next((p for _, p, _ in pools.values()), None)
    return SimResult(
        hits=hits,
        misses=accesses - hits,
        accesses=accesses,
        hit_rate=hits / accesses if accesses else 0.0,
        layer_hits=layer_hits,
        layer_misses=layer_misses,
        capacity=capacity if isinstance(capacity, int) else min(capacity),
        per_layer=per_layer,
        policy=getattr(any_policy, "name", "") if any_policy is not None else "",
        capacities=() if isinstance(capacity, int) else tuple(capacity),
    )
