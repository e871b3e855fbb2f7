"""The contract every registered cache policy passes (see cache_policies/base.py).

Random operation sequences (demand accesses, prefetches, drops, predictions, random pins) run
through a tiny reference cache that owns capacity and pins, and asks the policy only to rank.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_policies import (
    BeladyPolicy,
    CachePolicy,
    ExpertKey,
    StaticPolicy,
    available_policies,
    make_policy,
)

UNIVERSE = [ExpertKey(layer, expert) for layer in range(2) for expert in range(4)]
HOT = [ExpertKey(0, 1), ExpertKey(1, 2), ExpertKey(1, 3)]

# An op: (kind, key index, pin seed, probabilities for a "predict").
Op = tuple[str, int, int, tuple[float, ...]]
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["access", "access", "access", "prefetch", "drop", "predict"]),
        st.integers(0, len(UNIVERSE) - 1),
        st.integers(0, 2**16),
        st.tuples(*[st.floats(0.0, 1.0)] * 4),
    ),
    max_size=60,
)


def build(name: str, future: Sequence[ExpertKey]) -> CachePolicy:
    """A fresh instance of a registered policy, with what it needs to be constructed."""
    if name == "opt":
        return BeladyPolicy(future)
    if name == "static":
        return StaticPolicy(HOT)
    return make_policy(name)


@dataclass
class RefCache:
    """The smallest cache that follows the calling protocol, checking the policy's answers."""

    policy: CachePolicy
    capacity: int
    resident: list[ExpertKey] = field(default_factory=list)
    victims: list[ExpertKey] = field(default_factory=list)
    now: int = 0  # number of accesses so far = index of the next access

    def make_room(self, pinned: set[ExpertKey]) -> bool:
        if len(self.resident) < self.capacity:
            return True
        candidates = sorted(k for k in self.resident if k not in pinned)
        if not candidates:
            return False
        victim = self.policy.choose_victim(candidates, self.now)
        assert victim in candidates and victim not in pinned
        again = self.policy.choose_victim(list(reversed(candidates)), self.now)
        assert again == victim, "choose_victim must ignore candidate order and not mutate"
        self.resident.remove(victim)
        self.policy.on_evict(victim)
        self.victims.append(victim)
        return True

    def access(self, key: ExpertKey, pinned: set[ExpertKey]) -> None:
        if key in self.resident:
            self.policy.on_access(key, self.now)
        else:
            assert self.make_room(pinned | {key}), "the generator keeps a slot free"
            self.resident.append(key)
            self.policy.on_insert(key, self.now)
            self.policy.on_access(key, self.now)
        self.now += 1
        assert len(self.resident) <= self.capacity

    def prefetch(self, key: ExpertKey, pinned: set[ExpertKey]) -> None:
        if key not in self.resident and self.make_room(pinned | {key}):
            self.resident.append(key)
            self.policy.on_insert(key, self.now)
        assert len(self.resident) <= self.capacity


def plan(ops: list[Op], capacity: int) -> list[tuple[str, ExpertKey, set[ExpertKey], dict]]:
    """Turn raw ops into concrete calls; pins leave at least one slot evictable."""
    planned: list[tuple[str, ExpertKey, set[ExpertKey], dict]] = []
    for kind, index, seed, probs in ops:
        key = UNIVERSE[index]
        rng = random.Random(seed)
        pinned = {k for k in UNIVERSE if k != key and rng.random() < 0.3}
        pinned = set(sorted(pinned)[: max(0, capacity - 1)])
        scores = {ExpertKey(key.layer, e): p for e, p in enumerate(probs)}
        planned.append((kind, key, pinned, scores))
    return planned


def replay(name: str, ops: list[Op], capacity: int) -> tuple[list[ExpertKey], CachePolicy]:
    planned = plan(ops, capacity)
    future = [key for kind, key, _, _ in planned if kind == "access"]
    cache = RefCache(build(name, future), capacity)
    for kind, key, pinned, scores in planned:
        if kind == "access":
            cache.access(key, pinned)
        elif kind == "prefetch":
            cache.prefetch(key, pinned)
        elif kind == "drop" and key in cache.resident:
            cache.resident.remove(key)
            cache.policy.on_evict(key)
        elif kind == "predict":
            cache.policy.on_predict(scores, cache.now)
    return cache.victims, cache.policy


POLICIES = available_policies()


def test_all_builtins_are_registered() -> None:
    assert {"lru", "lfu", "lrfu", "router", "static", "opt"} <= set(POLICIES)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, capacity=st.integers(1, 6))
def test_contract(name: str, ops: list[Op], capacity: int) -> None:
    victims, policy = replay(name, ops, capacity)  # RefCache asserts membership and capacity
    assert all(v in UNIVERSE for v in victims)
    assert replay(name, ops, capacity)[0] == victims, "same calls must give the same victims"
    assert type(policy).name == name


@pytest.mark.parametrize("name", POLICIES)
def test_reset_forgets(name: str) -> None:
    ops: list[Op] = [("access", i % 8, i, (0.1, 0.2, 0.3, 0.4)) for i in range(20)]
    first, policy = replay(name, ops, 3)
    policy.reset()
    # Replaying through the reset instance gives the same victims as a fresh one.
    planned = plan(ops, 3)
    cache = RefCache(policy, 3)
    for _, key, pinned, _ in planned:
        cache.access(key, pinned)
    assert cache.victims == first


@pytest.mark.parametrize("name", POLICIES)
def test_single_candidate_is_returned(name: str) -> None:
    policy = build(name, [ExpertKey(0, 0), ExpertKey(0, 1)])
    for now, key in enumerate([ExpertKey(0, 0), ExpertKey(0, 1)]):
        policy.on_insert(key, now)
        policy.on_access(key, now)
    assert policy.choose_victim([ExpertKey(0, 1)], 2) == ExpertKey(0, 1)
    assert policy.choose_victim([ExpertKey(0, 0)], 2) == ExpertKey(0, 0)


@pytest.mark.parametrize("name", POLICIES)
def test_empty_candidates_is_an_error(name: str) -> None:
    policy = build(name, [ExpertKey(0, 0)])
    policy.on_insert(ExpertKey(0, 0), 0)
    with pytest.raises(ValueError, match="candidate"):
        policy.choose_victim([], 0)
