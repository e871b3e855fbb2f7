"""The eviction-policy interface: the cache owns capacity, the policy only ranks.

A cache pool (one tier of the runtime's expert cache, or one pool of the trace simulator) holds a
fixed number of slots and owns exactly one ``CachePolicy`` instance. The pool decides *when* to
evict (it is full and must make room) and *what may* be evicted (resident keys that are not
pinned); the policy only answers *which* of those to drop. A policy never learns the capacity,
never moves bytes, and never imports torch.

Who calls what, and when
------------------------
``now`` is a logical clock: the pool's access counter, which grows by one per access (the
simulator uses the global index of the access in the trace). Calls that are not accesses
(a prefetch insert, an eviction choice) carry the counter's current value, so several calls
may share one ``now``; only ``on_access`` calls are guaranteed strictly increasing.

* Hit: the key is resident and compute uses it ->
  ``on_access(key, now)``.
* Demand miss: the key is not resident ->
  if the pool is full: ``victim = choose_victim(candidates, now)`` then ``on_evict(victim)``;
  then ``on_insert(key, now)`` followed immediately by ``on_access(key, now)`` (same ``now``).
* Prefetch (the key is loaded before compute asks for it) ->
  the same eviction as a miss if needed, then ``on_insert(key, now)`` with no ``on_access``;
  a later use of the key is a hit (``on_access``).
* The pool drops a key for its own reasons (resize, invalidation) -> ``on_evict(key)``.
* Router predictions for upcoming layers -> ``on_predict(scores, now)``, where ``scores`` maps
  keys to probabilities. Policies that do not use predictions ignore it (the default).
* The pool is cleared -> ``reset()``: the policy forgets everything, as if newly built.

``on_access`` is only called for resident keys (inserted and not evicted since); ``on_evict``
only for resident keys. A policy may keep state about keys that left the pool (LFU counts do).

``choose_victim(candidates, now)``
----------------------------------
``candidates`` are the keys that are resident *and* evictable: the pool has already removed the
pinned ones (experts in use by the current layer, loads in flight), and it is never empty. It
may be a list or a read-only live view (the simulator passes one with O(1) ``in``); the policy
must return one element of it and must neither mutate nor keep it. ``choose_victim`` only
answers: it must not change the policy's state (asking twice gives the same answer); the pool
then calls ``on_evict`` for the key it actually drops.

The choice must be deterministic: the same sequence of calls must give the same victims,
whatever the order of ``candidates`` (the runtime lists slots, the simulator lists dict keys).
Ties are broken by a fixed rule (each built-in policy ranks by its score, then by recency, then
by the smallest ``(layer, expert)``); no dependence on set or hash iteration order, randomness
or wall-clock time. The trace simulator relies on this to reproduce the runtime's hit and miss
counts exactly.

Writing a policy
----------------
Subclass ``CachePolicy``, set a unique ``name``, implement the abstract methods, and pass it to
``cache_policies.make_policy`` by dotted path (``"mypkg.policies:MyPolicy"``) or register it with
``cache_policies.register_policy``. ``tests/test_policy_contract.py`` is the contract every
registered policy must pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

from cache_policies.keys import ExpertKey


class CachePolicy(ABC):
    """Ranks the resident experts of one cache pool for eviction (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def on_insert(self, key: ExpertKey, now: int) -> None:
        """``key`` became resident (after a demand miss or a prefetch)."""

    @abstractmethod
    def on_access(self, key: ExpertKey, now: int) -> None:
        """Compute used ``key`` (a hit, or right after ``on_insert`` on a demand miss)."""

    @abstractmethod
    def on_evict(self, key: ExpertKey) -> None:
        """``key`` left the pool (chosen as victim, or dropped by the pool itself)."""

    @abstractmethod
    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """Return the element of non-empty ``candidates`` to evict, deterministically."""

    def on_predict(self, scores: Mapping[ExpertKey, float], now: int) -> None:
        """Router predictions (probabilities) for upcoming layers; ignored unless overridden."""
        del scores, now

    @abstractmethod
    def reset(self) -> None:
        """Forget all state: the pool was emptied."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def require_candidates(candidates: Sequence[ExpertKey]) -> None:
    """Fail loudly on an empty candidate list: a pool bug, not something to paper over."""
    if not candidates:
        raise ValueError("choose_victim() needs at least one candidate; the pool passed none")
