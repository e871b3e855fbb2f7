"""Bookkeeping of one memory tier: which expert sits in which slot, what is pinned or loading.

The cache owns capacity and slots; the policy (``cache_policies``) only picks victims among the
candidates the cache offers: resident, not pinned, not loading, not protected. It moves no bytes;
callers hold the engine's lock around every method.

The policy is user code. Every call into it goes through ``_call``: an exception comes back as
a ``PolicyError`` naming the policy class and the hook, and each transition is ordered so that
a raise leaves the cache consistent: ``on_insert`` runs before a slot is claimed, ``on_evict``
after the slot was given back, ``on_access`` before a pin is taken (by the engine). "An
exception" is any ``BaseException`` but ``KeyboardInterrupt`` (``is_policy_fault``): a policy's
``SystemExit`` or ``GeneratorExit`` is a bug in the policy, not a request to end the program or
a generator; Ctrl-C stays an interrupt.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cache_policies import ExpertKey
from cache_policies.base import CachePolicy
from offload_rt.errors import OffloadError, PolicyError

RESIDENT, LOADING = "resident", "loading"


def is_policy_fault(exc: BaseException) -> bool:
    """Whether ``exc``, raised by policy code, is the policy's failure (a ``PolicyError``):
    anything but a ``KeyboardInterrupt``, which stays an interrupt."""
    return not isinstance(exc, KeyboardInterrupt)


@dataclass
class _Pool:
    capacity: int
    first_slot: int
    policy: CachePolicy
    slots: dict[ExpertKey, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.first_slot + self.capacity - 1, self.first_slot - 1, -1))


def pool_capacities(per_pool: int, num_pools: int, extra: int) -> tuple[int, ...]:
    """``num_pools`` capacities of ``per_pool`` slots, the first ``extra`` one more.

    Why the first: layer 0's experts are never prefetched (a prediction for layer l is made
    from layer l-1's hidden state, and nothing predicts the next token's layer 0), so its
    misses always stall; the next layers are predicted worst (the demo model's held-out
    trace: layer 1 with precision 0.45, layers 2-5 0.70-0.78; a random-weight Mixtral 8x7B
    shape: every layer 0.92-0.99). A static rule: a plan depends on the config and budget
    only."""
    return tuple(per_pool + (i < extra) for i in range(num_pools))


def describe(exc: BaseException) -> str:
    """``exc`` for a message: our own errors by their text, others as ``Type: text`` (never
    empty: ``KeyboardInterrupt()`` has no text)."""
    text = str(exc)
    if text and isinstance(exc, OffloadError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def policy_name(policy: CachePolicy) -> str:
    cls = type(policy)
    return f"{getattr(cls, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


class ExpertCache:
    """Slots of one tier, split into one pool per layer or a single global pool."""

    def __init__(self, name: str, slots_per_pool: int, num_pools: int,
                 policy_factory: Callable[[], CachePolicy],
                 on_evict: Callable[[ExpertKey], None] | None = None, *,
                 extra_slots: int = 0) -> None:
        """``num_pools`` pools of ``slots_per_pool`` slots, the first ``extra_slots`` of them
        one more (``pool_capacities``); slots are numbered pool after pool."""
        self.name = name
        self._on_evict = on_evict
        self.pools = []
        first = 0
        for capacity in pool_capacities(slots_per_pool, num_pools, extra_slots):
            self.pools.append(_Pool(capacity, first, self._build(policy_factory)))
            first += capacity
        self.state: dict[ExpertKey, str] = {}
        self.pins: Counter[ExpertKey] = Counter()
        self.now = 0  # the policies' logical clock: one tick per demand access

    def _build(self, policy_factory: Callable[[], CachePolicy]) -> CachePolicy:
        """A policy instance; its constructor is user code too (``PolicyError`` naming it)."""
        try:
            return policy_factory()
        except BaseException as exc:
            if not is_policy_fault(exc):
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            where = next((f"{f.name} ({f.filename}:{f.lineno})" for f in reversed(frames)
                          if f.name == "__init__"), "its constructor")
            raise PolicyError(f"the cache policy of the {self.name} tier could not be built: "
                              f"{where} raised {describe(exc)}") from exc

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

    def _call(self, pool: _Pool, hook: str, *args: Any) -> Any:
        """``pool.policy.<hook>(*args)``; an exception becomes a ``PolicyError`` (chained)."""
        try:
            return getattr(pool.policy, hook)(*args)
        except BaseException as exc:
            if not is_policy_fault(exc):
                raise
            shown = ", ".join(str(a) for a in args if not isinstance(a, (list, dict)))
            raise PolicyError(f"cache policy {policy_name(pool.policy)} raised in {hook}"
                              f"({shown}) on the {self.name} tier: {describe(exc)}") from exc

    def touch(self, key: ExpertKey) -> None:
        """A demand access of a resident key (a hit, or right after its miss was loaded)."""
        self._call(self.pool(key), "on_access", key, self.now)

    def reserve(self, key: ExpertKey, protected: Iterable[ExpertKey] = (),
                spare: Iterable[ExpertKey] = ()) -> int | None:
        """Claim a slot for loading ``key``; evict if the pool is full. None if nothing can go.
        ``protected`` keys are never evicted; ``spare`` keys (prefetched for a layer not yet
        reached) only when every other candidate is protected, pinned or loading: a policy
        that ranks a new key low (LFU) would otherwise evict a prefetch before its layer ran.
        ``PolicyError``: the policy raised or chose a non-candidate; nothing was claimed."""
        pool = self.pool(key)
        if not pool.free:
            keep = set(protected)
            candidates = sorted(k for k in pool.slots if self.state[k] == RESIDENT
                                and not self.pins[k] and k not in keep)
            spared = set(spare)
            candidates = [k for k in candidates if k not in spared] or candidates
            if not candidates:
                return None
            victim = self._call(pool, "choose_victim", candidates, self.now)
            if victim not in candidates:
                shown = ", ".join(map(str, candidates[:8]))
                raise PolicyError(f"cache policy {policy_name(pool.policy)} chose {victim} in "
                                  f"choose_victim on the {self.name} tier, not one of the "
                                  f"{len(candidates)} evictable candidates ({shown})")
            self.evict(victim)
        self._call(pool, "on_insert", key, self.now)  # first: a raise claims nothing
        slot = pool.free.pop()
        pool.slots[key] = slot
        self.state[key] = LOADING
        return slot

    def evict(self, key: ExpertKey) -> None:
        """Give ``key``'s slot back, then tell the policy (a ``PolicyError`` from it leaves the
        key evicted)."""
        pool = self.pool(key)
        pool.free.append(pool.slots.pop(key))
        del self.state[key]
        try:
            self._call(pool, "on_evict", key)
        finally:
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

    def loading_keys(self, key: ExpertKey) -> list[ExpertKey]:
        """Keys of ``key``'s pool whose load is in flight."""
        return [k for k in self.pool(key).slots if self.state[k] == LOADING]

    def predict(self, scores: dict[ExpertKey, float]) -> None:
        """Forward router predictions to the policies (the 'router' policy uses them)."""
        for pool in self.pools:
            self._call(pool, "on_predict", scores, self.now)
