"""Eviction sequences worked out by hand, one small story per policy."""

from __future__ import annotations

import math
import random

import pytest

from cache_policies import (
    BeladyPolicy,
    CachePolicy,
    ExpertKey,
    LFUPolicy,
    LRFUPolicy,
    LRUPolicy,
    RouterPolicy,
    StaticPolicy,
    flatten,
    simulate,
)
from cache_policies.belady import NEVER, FutureAccesses

A, B, C, D, E = (ExpertKey(0, e) for e in range(5))


def victims(policy: CachePolicy, sequence: list[ExpertKey], capacity: int) -> list[ExpertKey]:
    """Demand-page ``sequence`` through one pool; return the evicted keys in order."""
    resident: list[ExpertKey] = []
    evicted: list[ExpertKey] = []
    for now, key in enumerate(sequence):
        if key in resident:
            policy.on_access(key, now)
            continue
        if len(resident) == capacity:
            victim = policy.choose_victim(sorted(k for k in resident if k != key), now)
            resident.remove(victim)
            policy.on_evict(victim)
            evicted.append(victim)
        resident.append(key)
        policy.on_insert(key, now)
        policy.on_access(key, now)
    return evicted


def touch(policy: CachePolicy, key: ExpertKey, now: int) -> None:
    policy.on_insert(key, now)
    policy.on_access(key, now)


def test_lru() -> None:
    assert victims(LRUPolicy(), [A, B, C, A, D], 3) == [B]
    assert victims(LRUPolicy(), [A, B, C, A, D, E, B], 3) == [B, C, A]


def test_lru_prefetched_key_counts_as_recent() -> None:
    lru = LRUPolicy()
    touch(lru, A, 0)
    lru.on_insert(B, 1)  # prefetch, never accessed
    assert lru.choose_victim([A, B], 1) == A


def test_lfu_ties_go_to_least_recent() -> None:
    # A used twice; B and C once each, B longer ago -> D evicts B, then E evicts C (D is newer).
    assert victims(LFUPolicy(), [A, A, B, C, D, E], 3) == [B, C]


@pytest.mark.parametrize(("persistent", "expected"), [(True, A), (False, B)])
def test_lfu_counts_persist_across_evictions(persistent: bool, expected: ExpertKey) -> None:
    lfu = LFUPolicy(persistent=persistent)
    touch(lfu, B, 0)
    lfu.on_access(B, 1)
    lfu.on_access(B, 2)  # B: 3 uses
    lfu.on_evict(B)
    touch(lfu, A, 3)
    lfu.on_access(A, 4)  # A: 2 uses
    touch(lfu, B, 5)  # B back: 4 uses if counts persist, else 1
    assert lfu.choose_victim([A, B], 6) == expected


def test_lfu_prefetch_is_not_a_use() -> None:
    lfu = LFUPolicy()
    touch(lfu, A, 0)
    lfu.on_insert(B, 1)
    assert lfu.choose_victim([A, B], 1) == B


def test_lrfu_decay_slides_between_lru_and_lfu() -> None:
    # A at t=0,1,2; B at t=3; evict at now=4.
    # decay=1:   CRF(A) = .5^4 + .5^3 + .5^2 = .4375 < CRF(B) = .5      -> A (like LRU)
    # decay=0.1: CRF(A) = .5^.4 + .5^.3 + .5^.2 = 2.44 > CRF(B) = .933  -> B (like LFU)
    for decay, expected in [(1.0, A), (0.1, B), (0.0, B)]:
        lrfu = LRFUPolicy(decay=decay)
        touch(lrfu, A, 0)
        lrfu.on_access(A, 1)
        lrfu.on_access(A, 2)
        touch(lrfu, B, 3)
        assert lrfu.choose_victim([A, B], 4) == expected, decay
    lrfu = LRFUPolicy(decay=1.0)
    for now, key in enumerate([A, A, A, B]):
        lrfu.on_access(key, now)
    assert math.isclose(2 ** lrfu.score(A, 4), 0.4375)
    assert math.isclose(2 ** lrfu.score(B, 4), 0.5)


def test_lrfu_incremental_score_matches_the_sum() -> None:
    rng = random.Random(7)
    lrfu = LRFUPolicy(decay=0.05)
    times: dict[ExpertKey, list[int]] = {A: [], B: [], C: []}
    for now in range(300):
        key = rng.choice([A, B, C])
        lrfu.on_access(key, now)
        times[key].append(now)
    for key, ts in times.items():
        exact = sum(0.5 ** (0.05 * (300 - t)) for t in ts)
        assert math.isclose(2 ** lrfu.score(key, 300), exact, rel_tol=1e-9)


def test_lrfu_long_idle_keys_do_not_underflow_into_ties() -> None:
    lrfu = LRFUPolicy(decay=1.0)
    touch(lrfu, A, 0)
    lrfu.on_access(A, 1)  # A: two accesses, B: one later access; both idle ~1e5 steps
    touch(lrfu, B, 2)
    # 0.5 ** 1e5 is 0.0 for both, yet B's single access is newer and still wins.
    assert lrfu.choose_victim([A, B], 100_000) == A


def test_lrfu_rejects_bad_decay() -> None:
    with pytest.raises(ValueError, match="decay"):
        LRFUPolicy(decay=-1.0)


def test_router_evicts_lowest_prediction_then_lru() -> None:
    router = RouterPolicy()
    for now, key in enumerate([A, B, C, D]):
        touch(router, key, now)
    router.on_predict({A: 0.6, B: 0.3, C: 0.1}, 4)  # D unpredicted = 0
    assert router.choose_victim([A, B, C, D], 4) == D
    assert router.choose_victim([A, B, C], 4) == C
    # A newer prediction for layer 0 replaces the old one: A and C drop to 0, tie -> LRU (A).
    router.on_predict({B: 0.5, D: 0.5}, 5)
    assert router.choose_victim([A, B, C, D], 5) == A
    assert router.predicted(C) == 0.0
    # A prediction for another layer leaves layer 0's alone.
    router.on_predict({ExpertKey(1, 0): 0.9}, 6)
    assert router.predicted(B) == 0.5


def test_router_without_predictions_is_lru() -> None:
    sequence = [A, B, C, A, D, E, B, A, C]
    assert victims(RouterPolicy(), sequence, 3) == victims(LRUPolicy(), sequence, 3)


def test_static_keeps_hot_keys_while_it_can() -> None:
    static = StaticPolicy(hot=[A])
    for now, key in enumerate([A, B, C]):
        touch(static, key, now)
    assert static.choose_victim([A, B, C], 3) == B  # oldest non-hot; A is older but hot
    assert static.choose_victim([A, C], 3) == C
    assert static.choose_victim([A], 3) == A  # hot is a preference, not a pin
    # In a stream: A stays although it is the least recently used.
    assert victims(StaticPolicy(hot=[A]), [A, B, C, D, E], 2) == [B, C, D]


def test_static_from_trace_takes_most_used_per_layer() -> None:
    x, y = ExpertKey(1, 3), ExpertKey(1, 5)
    trace = [A, A, B, B, C, x, y, y]
    assert StaticPolicy.from_trace(trace, per_layer=1).hot == {A, y}  # A/B tie: smaller id
    assert StaticPolicy.from_trace(trace, per_layer=2).hot == {A, B, x, y}


def test_opt_classic_reference_string() -> None:
    # 1 2 3 4 1 2 5 1 2 3 4 5 with 3 frames: Belady's MIN makes 7 faults (LRU makes 10).
    k = {i: ExpertKey(0, i) for i in range(1, 6)}
    sequence = [k[i] for i in (1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5)]
    # At 4: next uses 1@4, 2@5, 3@9 -> evict 3. At 5: 1@7, 2@8, 4@10 -> evict 4.
    # At 3: 1 and 2 never used again, 5@11 -> tie on "never", smaller key: evict 1.
    # At 4: 2 never used again, 3 never, 5@11 -> evict 2.
    assert victims(BeladyPolicy(sequence), sequence, 3) == [k[3], k[4], k[1], k[2]]
    steps = [[key] for key in sequence]
    assert simulate(steps, lambda: BeladyPolicy(flatten(steps)), 3, per_layer=False).misses == 7
    assert simulate(steps, LRUPolicy, 3, per_layer=False).misses == 10


def test_opt_prefetch_looks_up_the_next_use() -> None:
    future = FutureAccesses([A, B, A, C, B])
    assert future.next_use == [2, 4, NEVER, NEVER, NEVER]
    assert future.first_use_from(B, 2) == 4
    assert future.first_use_from(C, 4) == NEVER
    opt = BeladyPolicy(future)
    touch(opt, A, 0)
    opt.on_insert(C, 1)  # prefetched: next use at 3; A's is at 2
    assert opt.choose_victim([A, C], 1) == C


def test_opt_rejects_a_misaligned_clock() -> None:
    opt = BeladyPolicy([A, B])
    with pytest.raises(ValueError, match="index"):
        opt.on_access(B, 0)
    with pytest.raises(ValueError, match="end of the trace"):
        opt.on_access(A, 5)
