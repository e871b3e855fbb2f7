"""Bookkeeping of one memory tier: which expert sits in which slot, what is pinned or loading.

The cache owns capacity and slots; the policy (``cache_policies``) only picks victims among the
candidates the cache offers: resident, not pinned, not loading, not protected. It moves no bytes;
callers hold the engine's lock around every method.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cache_policies import ExpertKey
from cache_policies.base import CachePolicy

RESIDENT, LOADING = "resident", "loading"


@dataclass
class _Pool:
    capacity: int
    first_slot: int
    policy: CachePolicy
    slots: dict[ExpertKey, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.first_slot + self.capacity - 1, self.first_slot - 1, -1))


class ExpertCache:
    """Slots of one tier, split into one pool per layer or a single global pool."""

    def __init__(self, name: str, slots_per_pool: int, num_pools: int,
                 policy_factory: Callable[[], CachePolicy],
                 on_evict: Callable[[ExpertKey], None] | None = None) -> None:
        self.name = name
        self._on_evict = on_evict
        self.pools = [_Pool(slots_per_pool, i * slots_per_pool, policy_factory())
                      for i in range(num_pools)]
        self.state: dict[ExpertKey, str] = {}
        self.pins: Counter[ExpertKey] = Counter()
        self.now = 0  # the policies' logical clock: one tick per demand access

    @property
    def num_slots(self) -> int:
        return sum(p.capacity for p in self.pools)

    def pool(self, key: ExpertKey) -> _Pool:
        return self.pools[key.layer] if len(self.pools) > 1 else self.pools[0]

    def slot(self, key: ExpertKey) -> int | None:
        """The slot of a resident or loading key, else None."""
        return self.pool(key).slots.get(key)

    def tick(self) -> int:
        self.now += 1
        return self.now

    def touch(self, key: ExpertKey) -> None:
        """A demand access of a resident key (a hit, or right after its miss was loaded)."""
        self.pool(key).policy.on_access(key, self.now)

    def reserve(self, key: ExpertKey, protected: Iterable[ExpertKey] = ()) -> int | None:
        """Claim a slot for loading ``key``; evict if the pool is full. None if nothing can go."""
        pool = self.pool(key)
        if not pool.free:
            keep = set(protected)
            candidates = [k for k in pool.slots if self.state[k] == RESIDENT
                          and not self.pins[k] and k not in keep]
            if not candidates:
                return None
            victim = pool.policy.choose_victim(sorted(candidates), self.now)
            if victim not in candidates:
                raise RuntimeError(f"policy {pool.policy.name!r} chose {victim}, "
                                   "not an evictable candidate")
            self.evict(victim)
        slot = pool.free.pop()
        pool.slots[key] = slot
        self.state[key] = LOADING
        pool.policy.on_insert(key, self.now)
        return slot

    def evict(self, key: ExpertKey) -> None:
        pool = self.pool(key)
        pool.free.append(pool.slots.pop(key))
        del self.state[key]
        pool.policy.on_evict(key)
        if self._on_evict is not None:
            self._on_evict(key)

    def commit(self, key: ExpertKey) -> None:
        """A load into ``key``'s slot finished: the bytes are valid."""
        self.state[key] = RESIDENT

    def abort(self, key: ExpertKey) -> None:
        """A load failed: give the slot back."""
        if key in self.state:
            self.evict(key)

    def pin(self, key: ExpertKey) -> None:
        self.pins[key] += 1

    def unpin(self, key: ExpertKey) -> None:
        self.pins[key] -= 1
        if self.pins[key] <= 0:
            del self.pins[key]

    def resident_keys(self) -> list[ExpertKey]:
        return [k for k, s in self.state.items() if s == RESIDENT]

    def predict(self, scores: dict[ExpertKey, float]) -> None:
        """Forward router predictions to the policies (the 'router' policy uses them)."""
        for pool in self.pools:
            pool.policy.on_predict(scores, self.now)
