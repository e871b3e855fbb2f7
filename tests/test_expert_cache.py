"""``ExpertCache`` with real policies: what may be evicted, capacity per pool, a hand-checked
LRU sequence, and the order of the calls a policy receives (``cache_policies/base.py``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_policies import ExpertKey, LFUPolicy, LRUPolicy, make_policy
from cache_policies.base import CachePolicy
from offload_rt.engine.expert_cache import LOADING, RESIDENT, ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts, Tier
from offload_rt.engine.placement import AlignedPlacement
from offload_rt.engine.slots import SlotPool

K = ExpertKey
NUMEL = 8  # elements of one fake packed expert


class RecordingPolicy(CachePolicy):
    """Records every call, in order, and lets an inner policy decide."""

    name: ClassVar[str] = "recording"

    def __init__(self, inner: CachePolicy | None = None) -> None:
        self.inner = inner or LRUPolicy()
        self.calls: list[tuple] = []

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self.calls.append(("insert", key, now))
        self.inner.on_insert(key, now)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self.calls.append(("access", key, now))
        self.inner.on_access(key, now)

    def on_evict(self, key: ExpertKey) -> None:
        self.calls.append(("evict", key))
        self.inner.on_evict(key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        victim = self.inner.choose_victim(candidates, now)
        self.calls.append(("victim", tuple(sorted(candidates)), victim, now))
        return victim

    def on_predict(self, scores: Mapping[ExpertKey, float], now: int) -> None:
        self.calls.append(("predict", now))
        self.inner.on_predict(scores, now)

    def reset(self) -> None:
        self.calls.append(("reset",))
        self.inner.reset()


def demand(cache: ExpertCache, key: ExpertKey,
           protected: Sequence[ExpertKey] = ()) -> tuple[bool, int | None]:
    """One demand access as the engine makes it: (hit?, slot). Slot None: no room."""
    cache.tick()
    if cache.state.get(key) == RESIDENT:
        cache.touch(key)
        return True, cache.slot(key)
    slot = cache.reserve(key, protected)
    if slot is not None:
        cache.commit(key)
        cache.touch(key)
    return False, slot


def make_cache(slots_per_pool: int, pools: int = 1,
               factory: Callable[[], CachePolicy] = LRUPolicy) -> tuple[ExpertCache, list]:
    evicted: list[ExpertKey] = []
    return ExpertCache("device", slots_per_pool, pools, factory, evicted.append), evicted


def check_pools(cache: ExpertCache) -> None:
    """Each pool holds at most its capacity, in its own slot range, each slot once."""
    for pool in cache.pools:
        assert len(pool.slots) <= pool.capacity
        used = sorted([*pool.slots.values(), *pool.free])
        assert used == list(range(pool.first_slot, pool.first_slot + pool.capacity))
    assert set(cache.state) == {k for p in cache.pools for k in p.slots}


# ---- what may be evicted -----------------------------------------------------------------------

def test_hand_checked_lru_sequence() -> None:
    cache, evicted = make_cache(3)
    seq = [1, 2, 3, 1, 4, 2, 5, 1, 2, 3]
    # LRU order (oldest first) after each access:
    # 1 | 1 2 | 1 2 3 | 2 3 1 (hit) | 3 1 4 (-2) | 1 4 2 (-3) | 4 2 5 (-1) | 2 5 1 (-4)
    # | 5 1 2 (hit) | 1 2 3 (-5)
    hits = [demand(cache, K(0, e))[0] for e in seq]
    assert hits == [False, False, False, True, False, False, False, False, True, False]
    assert evicted == [K(0, 2), K(0, 3), K(0, 1), K(0, 4), K(0, 5)]
    assert sorted(cache.resident_keys()) == [K(0, 1), K(0, 2), K(0, 3)]
    check_pools(cache)


def test_pinned_key_is_never_evicted() -> None:
    cache, evicted = make_cache(2)
    demand(cache, K(0, 0))
    demand(cache, K(0, 1))
    cache.pin(K(0, 0))  # the LRU key, but in use
    for e in range(2, 6):
        assert demand(cache, K(0, e))[1] is not None
        assert K(0, 0) in cache.state
    assert K(0, 0) not in evicted
    cache.unpin(K(0, 0))
    demand(cache, K(0, 9))
    assert evicted[-1] == K(0, 0)  # unpinned, it is the oldest again


def test_protected_key_is_never_evicted_by_reserve() -> None:
    cache, evicted = make_cache(3)
    for e in (0, 1, 2):
        demand(cache, K(0, e))
    assert demand(cache, K(0, 3), protected=[K(0, 0), K(0, 1)]) == (False, cache.slot(K(0, 3)))
    assert evicted == [K(0, 2)]  # 0 and 1 were older, but protected
    assert cache.reserve(K(0, 4), [K(0, 0), K(0, 1), K(0, 3)]) is None
    assert K(0, 4) not in cache.state and evicted == [K(0, 2)]


def test_reserve_returns_none_when_every_resident_key_is_pinned_or_loading() -> None:
    policy = RecordingPolicy()
    cache, evicted = make_cache(2, factory=lambda: policy)
    demand(cache, K(0, 0))
    cache.pin(K(0, 0))
    assert cache.reserve(K(0, 1)) is not None  # loading: not committed
    assert cache.state[K(0, 1)] == LOADING
    before = list(policy.calls)
    assert cache.reserve(K(0, 2)) is None
    assert policy.calls == before  # no victim asked, nothing inserted
    assert evicted == [] and K(0, 2) not in cache.state
    cache.commit(K(0, 1))
    assert cache.reserve(K(0, 2)) is not None  # 1 is resident and unpinned now
    assert evicted == [K(0, 1)]
    check_pools(cache)


def test_abort_gives_the_slot_back() -> None:
    cache, evicted = make_cache(1)
    slot = cache.reserve(K(0, 0))
    cache.abort(K(0, 0))
    assert K(0, 0) not in cache.state and evicted == [K(0, 0)]
    assert cache.reserve(K(0, 1)) == slot
    check_pools(cache)


def test_capacity_holds_per_layer_pool() -> None:
    cache, evicted = make_cache(2, pools=3)
    for layer in range(3):
        for e in range(2):
            demand(cache, K(layer, e))
    for e in range(2, 8):  # layer 1 churns; layers 0 and 2 are untouched
        demand(cache, K(1, e))
        check_pools(cache)
        assert all(k.layer == 1 for k in evicted)
    assert sorted(cache.pools[0].slots) == [K(0, 0), K(0, 1)]
    assert sorted(cache.pools[2].slots) == [K(2, 0), K(2, 1)]
    assert sorted(cache.pools[1].slots) == [K(1, 6), K(1, 7)]
    assert {cache.slot(K(1, 6)), cache.slot(K(1, 7))} == {2, 3}  # pool 1 owns slots 2 and 3


def test_capacity_holds_in_one_global_pool() -> None:
    cache, evicted = make_cache(4)
    for key in (K(0, 0), K(1, 0), K(2, 0), K(0, 1)):
        demand(cache, key)
    demand(cache, K(2, 5))  # any layer's key competes with every other
    assert evicted == [K(0, 0)]
    demand(cache, K(1, 0))  # hit: now the most recent
    demand(cache, K(2, 6))
    assert evicted == [K(0, 0), K(2, 0)]
    assert len(cache.resident_keys()) == cache.num_slots == 4
    check_pools(cache)


# ---- the order of the policy's calls -----------------------------------------------------------

def test_policy_call_order_for_hit_miss_prefetch_and_eviction() -> None:
    policy = RecordingPolicy()
    cache, _ = make_cache(2, factory=lambda: policy)
    demand(cache, K(0, 0))  # miss, now 1
    demand(cache, K(0, 0))  # hit, now 2
    cache.reserve(K(0, 1))  # a prefetch insert at now 2: no access
    cache.commit(K(0, 1))
    demand(cache, K(0, 2))  # miss at now 3 with a full pool: 0 is older than 1
    assert policy.calls == [
        ("insert", K(0, 0), 1), ("access", K(0, 0), 1),
        ("access", K(0, 0), 2),
        ("insert", K(0, 1), 2),
        ("victim", (K(0, 0), K(0, 1)), K(0, 0), 3), ("evict", K(0, 0)),
        ("insert", K(0, 2), 3), ("access", K(0, 2), 3),
    ]


def test_predictions_reach_every_pool() -> None:
    policies = [RecordingPolicy() for _ in range(2)]
    it = iter(policies)
    cache, _ = make_cache(1, pools=2, factory=lambda: next(it))
    cache.predict({K(1, 0): 0.9})
    assert [p.calls for p in policies] == [[("predict", 0)], [("predict", 0)]]


# ---- through the engine, with a fake reader ------------------------------------------------------

def fake_engine(slots_per_pool: int, pools: int = 1,
                factory: Callable[[], CachePolicy] = LRUPolicy
                ) -> tuple[OffloadedExperts, list[ExpertKey]]:
    reads: list[ExpertKey] = []

    def reader(key: ExpertKey, out: torch.Tensor) -> None:
        reads.append(key)
        out.copy_(torch.arange(NUMEL) + 1000 * key.layer + 10 * key.expert)

    cache = ExpertCache("device", slots_per_pool, pools, factory)
    slots = SlotPool(cache.num_slots, NUMEL, torch.float32, torch.device("cpu"))
    return OffloadedExperts(Tier(cache, slots), reader, NUMEL * 4,
                            placement=AlignedPlacement()), reads


def acquire(engine: OffloadedExperts, layer: int, experts: list[int]) -> None:
    with engine.acquire(layer, experts) as buffers:
        assert sorted(buffers) == experts
        for e, buf in buffers.items():  # every buffer holds its own expert's bytes
            assert torch.equal(buf, torch.arange(NUMEL) + 1000.0 * layer + 10 * e)


def test_engine_does_not_evict_a_key_its_group_needs() -> None:
    """Regression: the demand path guarded only pinned keys, so loading expert 3 evicted
    expert 5 (older, not pinned yet) although the same group needed it: a second miss and a
    second disk read for 5, and counts that differ from the trace simulator's."""
    engine, reads = fake_engine(2)
    acquire(engine, 0, [5, 7])
    acquire(engine, 0, [3, 5])  # LRU order 5, 7: the victim must be 7, not 5
    assert reads == [K(0, 5), K(0, 7), K(0, 3)]
    assert (engine.stats.hits, engine.stats.misses) == (1, 3)


def test_engine_follows_the_policy_protocol() -> None:
    """The engine's demand path makes exactly the documented calls: a miss is (victim, evict)
    if full, then insert and access at one ``now``; a hit is one access; ``on_access`` and
    ``on_evict`` only for resident keys; access times strictly increase."""
    policies: list[RecordingPolicy] = []

    def factory() -> CachePolicy:
        policies.append(RecordingPolicy(LFUPolicy()))
        return policies[-1]

    engine, _ = fake_engine(2, pools=2, factory=factory)
    steps = [(0, [0, 1]), (1, [2, 3]), (0, [1, 2]), (1, [0, 3]), (0, [0, 1]), (0, [3]),
             (1, [1, 2]), (0, [1, 2]), (1, [2, 3]), (0, [0, 3])]
    for layer, experts in steps:
        acquire(engine, layer, experts)
    for policy in policies:
        resident: set[ExpertKey] = set()
        last_access = 0
        calls = policy.calls
        for i, call in enumerate(calls):
            if call[0] == "victim":
                _, candidates, victim, _ = call
                assert set(candidates) <= resident and victim in candidates
                assert calls[i + 1] == ("evict", victim)
            elif call[0] == "evict":
                assert call[1] in resident and calls[i - 1][0] == "victim"
                resident.discard(call[1])
            elif call[0] == "insert":
                assert call[1] not in resident
                resident.add(call[1])
                assert calls[i + 1] == ("access", call[1], call[2])  # prefetch is off
            elif call[0] == "access":
                assert call[1] in resident and call[2] > last_access
                last_access = call[2]
        assert resident == set(engine.device.cache.pools[policies.index(policy)].slots)


def two_tier_engine(device_slots: int, host_slots: int) -> tuple[OffloadedExperts,
                                                                  list[ExpertKey]]:
    """The CUDA layout (disk -> host tier -> device tier) with both tiers in CPU memory."""
    engine, reads = fake_engine(device_slots)
    host = ExpertCache("host", host_slots, 1, LRUPolicy)
    engine.host = Tier(host, SlotPool(host.num_slots, NUMEL, torch.float32, torch.device("cpu")))
    return engine, reads


def test_host_tier_keeps_what_the_group_still_needs() -> None:
    """Loading expert 0 into a full host tier must not evict expert 1 (least recently used, but
    the same group needs it next): that would read 1 from disk again."""
    engine, reads = two_tier_engine(device_slots=2, host_slots=3)
    acquire(engine, 0, [0, 1])
    acquire(engine, 0, [2, 3])  # host tier now {1, 2, 3}; device {2, 3}
    acquire(engine, 0, [0, 1])
    assert reads == [K(0, 0), K(0, 1), K(0, 2), K(0, 3), K(0, 0)]
    assert (engine.stats.host_hits, engine.stats.host_misses) == (1, 5)


def test_host_tier_smaller_than_the_group_still_makes_progress() -> None:
    """When every unpinned host slot holds a key of the group, one of them must go anyway."""
    engine, reads = two_tier_engine(device_slots=3, host_slots=2)
    acquire(engine, 0, [0, 1])
    acquire(engine, 0, [0, 1, 2])  # host {0, 1}, both in the group: 0 (LRU) makes room for 2
    assert reads == [K(0, 0), K(0, 1), K(0, 2)]
    acquire(engine, 0, [0, 1, 2])  # all on the device: no host traffic at all
    assert reads == [K(0, 0), K(0, 1), K(0, 2)]


# ---- properties -------------------------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["demand", "prefetch", "commit", "pin", "unpin",
                                          "abort"]),
                         st.integers(0, 2), st.integers(0, 5)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, pools=st.sampled_from([1, 3]), capacity=st.integers(1, 3),
       policy=st.sampled_from(["lru", "lfu", "lrfu", "router", "static"]))
def test_random_operations_keep_the_invariants(ops: list[tuple[str, int, int]], pools: int,
                                               capacity: int, policy: str) -> None:
    cache, evicted = make_cache(capacity, pools, lambda: make_policy(policy))
    pins: dict[ExpertKey, int] = {}
    for op, layer, expert in ops:
        key = K(layer, expert)
        protected = [K(layer, (expert + 1) % 6)]
        before = len(evicted)  # a key can be evicted more than once: count, do not dedupe
        if op in ("demand", "prefetch") and key not in cache.state:
            cache.tick()
            pool = cache.pool(key)
            room = bool(pool.free) or any(cache.state[k] == RESIDENT and not pins.get(k)
                                          and k not in protected for k in pool.slots)
            slot = cache.reserve(key, protected)
            assert (slot is not None) == room
            if slot is not None and op == "demand":
                cache.commit(key)
                cache.touch(key)
        elif op == "commit" and cache.state.get(key) == LOADING:
            cache.commit(key)
        elif op == "abort" and cache.state.get(key) == LOADING:
            cache.abort(key)
        elif op == "pin" and cache.state.get(key) == RESIDENT:
            cache.pin(key)
            pins[key] = pins.get(key, 0) + 1
        elif op == "unpin" and pins.get(key):
            cache.unpin(key)
            pins[key] -= 1
        gone = [k for k in evicted[before:] if k != key]
        assert not any(pins.get(k) for k in gone), "a pinned key was evicted"
        assert not any(k in protected for k in gone), "a protected key was evicted"
        assert all(k in cache.state for k, n in pins.items() if n)
        assert {k: n for k, n in cache.pins.items() if n} == {k: n for k, n in pins.items() if n}
        check_pools(cache)


@pytest.mark.parametrize("pools", [1, 2])
def test_slot_contents_follow_the_keys(pools: int) -> None:
    """Slots are reused constantly; a buffer must always hold the bytes of the key it is
    handed out for (``acquire`` checks every buffer)."""
    engine, reads = fake_engine(2, pools=pools)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        layer = int(torch.randint(0, 2, (1,), generator=gen))
        experts = sorted(set(torch.randint(0, 6, (2,), generator=gen).tolist()))
        acquire(engine, layer, experts)
    assert engine.stats.misses == len(reads)
    assert dict(engine.device.cache.pins) == {}


def test_spare_keys_are_evicted_only_when_nothing_else_can_go() -> None:
    cache, evicted = make_cache(3)
    for e in (0, 1, 2):
        demand(cache, K(0, e))
    assert cache.reserve(K(0, 3), spare=[K(0, 0)]) is not None
    assert evicted == [K(0, 1)]  # 0 is the least recent, but spared
    cache.commit(K(0, 3))
    assert cache.reserve(K(0, 4), [K(0, 3)], spare=[K(0, 0), K(0, 2)]) is not None
    assert evicted == [K(0, 1), K(0, 0)]  # only spared candidates left: the policy's choice
    check_pools(cache)


def test_a_prefetched_key_survives_the_current_layers_misses() -> None:
    """Regression: a policy that ranks a new key low (LFU: one use) evicted the expert just
    prefetched for the next layer to make room for the current layer's miss: the prefetch was
    read for nothing and read again on demand (a Mixtral 8x7B run in 8 GiB read 76 experts per
    token with LFU against 64 with LRU)."""
    engine, reads = fake_engine(3, factory=LFUPolicy)
    for e in (0, 1, 0, 1):
        acquire(engine, 0, [e])  # both used twice: LFU ranks them above a new key
    ids = torch.tensor([[2]])
    engine.on_route(0, torch.zeros(1, 8), ids)  # layer 0 needs expert 2 now
    engine._prefetch_one(K(1, 4))  # the prefetch thread's load for layer 1: the free slot
    acquire(engine, 0, [2])  # a miss: one of 0, 1 must go, not the prefetched (1, 4)
    engine.on_route(1, torch.zeros(1, 8), torch.tensor([[4]]))
    acquire(engine, 1, [4])
    assert reads == [K(0, 0), K(0, 1), K(1, 4), K(0, 2)]
    assert (engine.stats.prefetch_useful, engine.stats.prefetch_wasted) == (1, 0)


def test_prefetch_readers_keep_several_reads_in_flight() -> None:
    """With two readers, two predicted experts are read at the same time: the second read
    starts while the first has not returned (a disk with queue depth delivers more)."""
    import threading

    from offload_rt.engine.prefetch import PrefetchWorker

    cond, both = threading.Condition(), threading.Barrier(2, timeout=10)
    loaded: list[ExpertKey] = []

    class Engine:
        def load_one(self, key: ExpertKey) -> None:
            both.wait()  # returns only when the other reader is inside a read too
            with cond:
                loaded.append(key)

    engine = Engine()
    worker = PrefetchWorker(cond, engine.load_one, readers=2)
    with cond:
        worker.submit([K(1, 0), K(1, 1)])
        assert cond.wait_for(lambda: len(loaded) == 2 and not worker.busy, timeout=10)
    assert sorted(loaded) == [K(1, 0), K(1, 1)]
    assert worker.close()


def test_a_newer_prediction_replaces_the_queued_one() -> None:
    """What layer l predicted for layer l+2 but layer l+1's prediction no longer names is not
    read: the queue is the newest prediction alone (before: it stayed queued, ahead of the
    newer prediction's keys, and took a read and a slot). The reader is held on a first key so
    that the queue's content is what the newer submit left."""
    import threading

    from offload_rt.engine.prefetch import PrefetchWorker

    cond, started, release = threading.Condition(), threading.Event(), threading.Event()
    loaded: list[ExpertKey] = []

    class Engine:
        def load_one(self, key: ExpertKey) -> None:
            if key == K(1, 0):
                started.set()
                assert release.wait(10)
            with cond:
                loaded.append(key)

    engine = Engine()
    worker = PrefetchWorker(cond, engine.load_one, readers=1)
    with cond:
        worker.submit([K(1, 0), K(2, 3), K(2, 4)])  # at layer 0, depth 2
    assert started.wait(10)  # the reader holds K(1, 0); the rest is queued
    with cond:
        worker.submit([K(2, 4), K(2, 5), K(3, 1)])  # at layer 1: (2, 3) no longer predicted
    release.set()
    with cond:
        assert cond.wait_for(lambda: len(loaded) == 4 and not worker.busy, timeout=10)
    assert loaded == [K(1, 0), K(2, 4), K(2, 5), K(3, 1)]
    assert worker.close()
