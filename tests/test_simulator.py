"""The trace simulator, the policy registry, and the no-torch rule of cache_policies."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cache_policies
from cache_policies import (
    BeladyPolicy,
    CachePolicy,
    ExpertKey,
    FutureAccesses,
    LRUPolicy,
    StaticPolicy,
    available_policies,
    flatten,
    make_policy,
    register_policy,
    simulate,
)
from cache_policies import registry as registry_module
from cache_policies.lru import LRUPolicy as LRUFromModule

A, B, C, D = (ExpertKey(0, e) for e in range(4))
X, Y = ExpertKey(1, 0), ExpertKey(1, 1)
Trace = list[list[ExpertKey]]


# --- hand-computed traces ---------------------------------------------------------------


def test_step_keys_are_pinned_together() -> None:
    # Step 2 = (C, A): LRU would evict A (oldest), but A is pinned by the step, so B goes.
    result = simulate([[A, B], [C, A]], LRUPolicy, 2)
    assert (result.hits, result.misses, result.accesses) == (1, 3, 4)
    assert result.hit_rate == 0.25
    assert result.layer_hits == {0: 1} and result.layer_misses == {0: 3}
    assert (result.policy, result.capacity, result.per_layer) == ("lru", 2, True)


def test_per_layer_pools_versus_one_global_pool() -> None:
    trace = [[A], [X], [B], [Y], [A], [X]]
    per_layer = simulate(trace, LRUPolicy, 2)  # 2 slots per layer: everything fits
    assert (per_layer.hits, per_layer.misses) == (2, 4)
    global_pool = simulate(trace, LRUPolicy, 2, per_layer=False)  # 2 slots for both layers
    assert (global_pool.hits, global_pool.misses) == (0, 6)
    assert global_pool.layer_misses == {0: 3, 1: 3}
    assert simulate(trace, LRUPolicy, 4, per_layer=False).hits == 2


def test_num_layers_lists_every_layer_and_checks_range() -> None:
    result = simulate([[X]], LRUPolicy, 1, num_layers=3)
    assert result.layer_hits == {0: 0, 1: 0, 2: 0} and result.layer_misses == {0: 0, 1: 1, 2: 0}
    with pytest.raises(ValueError, match="num_layers=1"):
        simulate([[X]], LRUPolicy, 1, num_layers=1)


def test_capacity_must_hold_a_step() -> None:
    with pytest.raises(ValueError, match=r"step 1 needs 3 distinct experts .* capacity=2"):
        simulate([[A], [A, B, C]], LRUPolicy, 2)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        simulate([[A]], LRUPolicy, 0)
    # What counts is distinct keys per pool: a repeated key or another layer's key is fine.
    assert simulate([[A, A]], LRUPolicy, 1).hits == 1
    assert simulate([[A, X]], LRUPolicy, 1).misses == 2
    with pytest.raises(ValueError, match="the pool"):
        simulate([[A, X]], LRUPolicy, 1, per_layer=False)


def test_empty_trace() -> None:
    result = simulate([], LRUPolicy, 4)
    assert (result.accesses, result.hit_rate, result.layer_hits) == (0, 0.0, {})


def test_opt_gets_the_flattened_trace_in_per_layer_mode() -> None:
    trace = [[A, B], [X, Y], [C, A], [X, Y], [B, A], [Y, X]]
    future = FutureAccesses(flatten(trace))  # built once, shared by every layer's instance
    opt = simulate(trace, lambda: BeladyPolicy(future), 2)
    # Layer 0: at C the step pins A, so B goes; at B (step B, A) C goes. Layer 1 misses twice.
    assert (opt.hits, opt.misses) == (6, 6)
    assert opt.layer_hits == {0: 2, 1: 4}


class PickyPolicy(LRUPolicy):
    """Broken on purpose: always names a key that is not a candidate."""

    name = "picky"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return ExpertKey(99, 99)


def test_a_policy_returning_a_non_candidate_is_caught() -> None:
    with pytest.raises(RuntimeError, match="not an evictable resident key"):
        simulate([[A], [B]], PickyPolicy, 1)


# --- properties on random traces -----------------------------------------------------------


@st.composite
def traces(draw: st.DrawFn) -> tuple[Trace, int, bool]:
    """Random traces (steps of distinct experts of one layer) with a capacity that holds a step."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, min(3, experts)))
    n_steps = draw(st.integers(0, 40))
    trace: Trace = []
    for _ in range(n_steps):
        layer = draw(st.integers(0, layers - 1))
        chosen = draw(
            st.lists(st.integers(0, experts - 1), min_size=1, max_size=top_k, unique=True)
        )
        trace.append([ExpertKey(layer, e) for e in chosen])
    per_layer = draw(st.booleans())
    capacity = draw(st.integers(top_k, top_k + (4 if per_layer else 8)))
    return trace, capacity, per_layer


def factory(name: str, trace: Trace) -> Callable[[], CachePolicy]:
    if name == "opt":
        future = FutureAccesses(flatten(trace))
        return lambda: BeladyPolicy(future)
    if name == "static":
        return lambda: StaticPolicy.from_trace(flatten(trace), per_layer=1)
    return lambda: make_policy(name)


ONLINE = ["lru", "lfu", "lrfu", "router", "static"]


@settings(max_examples=300, deadline=None)
@given(case=traces())
def test_opt_is_never_beaten(case: tuple[Trace, int, bool]) -> None:
    trace, capacity, per_layer = case
    best = simulate(trace, factory("opt", trace), capacity, per_layer=per_layer).misses
    for name in ONLINE:
        misses = simulate(trace, factory(name, trace), capacity, per_layer=per_layer).misses
        assert best <= misses, name


def exhaustive_optimum(trace: Trace, capacity: int) -> int:
    """Fewest misses of any eviction choice for one global pool, by search (tiny traces only)."""
    flat = [(index, key) for index, step in enumerate(trace) for key in step]

    @functools.cache
    def fewest(i: int, resident: frozenset[ExpertKey]) -> int:
        if i == len(flat):
            return 0
        index, key = flat[i]
        if key in resident:
            return fewest(i + 1, resident)
        if len(resident) < capacity:
            return 1 + fewest(i + 1, resident | {key})
        evictable = resident - set(trace[index])
        return 1 + min(fewest(i + 1, (resident - {v}) | {key}) for v in evictable)

    return fewest(0, frozenset())


@settings(max_examples=150, deadline=None)
@given(case=traces())
def test_opt_is_optimal_even_with_step_pins(case: tuple[Trace, int, bool]) -> None:
    # Belady's proof assumes any resident key may go; here a step pins its keys. Search says
    # farthest-next-use among the unpinned keys is still optimal.
    trace, capacity, _ = case
    trace = trace[:10]
    opt = simulate(trace, factory("opt", trace), capacity, per_layer=False)
    assert opt.misses == exhaustive_optimum(trace, capacity)


def naive_simulate(trace: Trace, make: Callable[[], CachePolicy], capacity: int) -> list[int]:
    """The semantics written the slow, obvious way (per-layer pools, sorted candidate lists)."""
    pools: dict[int, tuple[list[ExpertKey], CachePolicy]] = {}
    misses = []
    now = 0
    for step in trace:
        for key in step:
            resident, policy = pools.setdefault(key.layer, ([], make()))
            if key in resident:
                policy.on_access(key, now)
            else:
                misses.append(now)
                if len(resident) == capacity:
                    victim = policy.choose_victim(sorted(set(resident) - set(step)), now)
                    resident.remove(victim)
                    policy.on_evict(victim)
                resident.append(key)
                policy.on_insert(key, now)
                policy.on_access(key, now)
            now += 1
    return misses


@settings(max_examples=100, deadline=None)
@given(case=traces())
def test_simulator_matches_the_obvious_implementation(case: tuple[Trace, int, bool]) -> None:
    trace, capacity, _ = case
    for name in [*ONLINE, "opt"]:
        expected = naive_simulate(trace, factory(name, trace), capacity)
        result = simulate(trace, factory(name, trace), capacity)
        assert result.misses == len(expected), name
        assert result.hits + result.misses == result.accesses == len(flatten(trace))
        assert sum(result.layer_misses.values()) == result.misses


# --- registry ------------------------------------------------------------------------------


class CountingPolicy(LRUPolicy):
    """A user-defined policy, reached by dotted path."""

    name = "test-counting"

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.start = start


NOT_A_POLICY = 42


def test_builtin_names() -> None:
    assert {"lru", "lfu", "lrfu", "router", "static", "opt"} <= set(available_policies())
    assert type(make_policy("lru")) is LRUFromModule
    assert make_policy("lrfu", decay=0.5).decay == 0.5
    assert make_policy("static", hot=[A]).hot == {A}
    assert make_policy("opt", future=[A, B]).future.keys == (A, B)


@pytest.mark.parametrize("sep", [":", "."])
def test_dotted_path_to_a_user_policy(sep: str) -> None:
    policy = make_policy(f"{__name__}{sep}CountingPolicy", start=3)
    assert isinstance(policy, CountingPolicy) and policy.start == 3
    result = simulate([[A], [B], [A]], lambda: make_policy(f"{__name__}:CountingPolicy"), 1)
    assert result.misses == 3


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown cache policy 'lruu'.*lfu, lrfu, lru, opt"):
        make_policy("lruu")


def test_bad_dotted_paths_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'") as info:
        make_policy("no_such_pkg.mod:Policy")
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(ValueError, match=f"module '{__name__}' has no attribute 'Missing'"):
        make_policy(f"{__name__}:Missing")
    with pytest.raises(ValueError, match="not a CachePolicy subclass"):
        make_policy(f"{__name__}:NOT_A_POLICY")
    with pytest.raises(ValueError, match="not a CachePolicy subclass"):
        make_policy("collections:OrderedDict")
    with pytest.raises(ValueError, match="abstract"):
        make_policy("cache_policies.base:CachePolicy")
    with pytest.raises(ValueError, match="not a valid dotted path"):
        make_policy(":Policy")


def test_register_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_registry", dict(registry_module._registry))
    assert register_policy(CountingPolicy) is CountingPolicy
    assert register_policy(CountingPolicy) is CountingPolicy  # again: a no-op
    assert "test-counting" in available_policies()
    assert isinstance(make_policy("test-counting"), CountingPolicy)

    class Impostor(LRUPolicy):
        name = "lru"

    with pytest.raises(ValueError, match="'lru' is already taken"):
        register_policy(Impostor)
    with pytest.raises(ValueError, match="not a CachePolicy subclass"):
        register_policy(dict)  # type: ignore[arg-type]


def test_register_needs_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_registry", dict(registry_module._registry))

    class Nameless(LRUPolicy):
        name = ""

    with pytest.raises(ValueError, match="needs a non-empty class attribute"):
        register_policy(Nameless)


# --- purity --------------------------------------------------------------------------------


def test_cache_policies_never_imports_torch() -> None:
    package = Path(cache_policies.__file__).parent
    modules = ["cache_policies"] + [
        f"cache_policies.{p.stem}" for p in sorted(package.glob("*.py")) if p.stem != "__init__"
    ]
    assert "cache_policies.simulator" in modules and "cache_policies.belady" in modules
    code = f"import {', '.join(modules)}; import sys; assert 'torch' not in sys.modules"
    root = str(package.parent)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
