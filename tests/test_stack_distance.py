"""One-pass stack depths (LRU, Belady's MIN) against the simulator, and sweeps built on them.

Issue 17, item 1: capacities for any pool layout, swept cheaply. A one-pass curve is only as
good as its agreement with ``simulate`` (whose counts equal the runtime's): checked at every
exact size on random traces (step pins, mixed layers, repeated keys), on recorded traces, and
through ``compare`` (one pass versus simulation, every field).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload_rt
from cache_policies import BeladyPolicy, ExpertKey, FutureAccesses, LRUPolicy, flatten, simulate
from cache_policies.compare import compare
from cache_policies.miss_curve import miss_curve
from cache_policies.stack_distance import largest_step, lru_depths, opt_depths
from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from offload_rt.trace_recorder import record_trace

Steps = list[list[ExpertKey]]


@st.composite
def step_lists(draw: st.DrawFn) -> Steps:
    """Steps of one layer each (as traces make), sometimes mixed layers or a repeated key."""
    layers, experts = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    steps = []
    for _ in range(draw(st.integers(0, 40))):
        layer = draw(st.integers(0, layers - 1))
        chosen = draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=3, unique=True))
        steps.append([ExpertKey(layer, e) for e in chosen])
    if steps and draw(st.booleans()):
        steps.append([ExpertKey(draw(st.integers(0, layers - 1)), draw(st.integers(0, 5)))
                      for _ in range(2)])  # any layers, maybe one key twice
    return steps


def hits_at(depths: list[int], size: int) -> int:
    return sum(1 for d in depths if 0 < d <= size)


@settings(max_examples=300, deadline=None)
@given(steps=step_lists(), per_layer=st.booleans())
def test_depths_give_the_simulators_hits_at_every_size(steps: Steps, per_layer: bool) -> None:
    future = FutureAccesses(flatten(steps))
    lru, opt = lru_depths(steps, per_layer), opt_depths(steps, per_layer)
    smallest = max(1, largest_step(steps, per_layer))
    for size in range(smallest, smallest + 8):
        assert hits_at(lru, size) == simulate(steps, LRUPolicy, size, per_layer=per_layer).hits
        assert hits_at(opt, size) == simulate(steps, lambda: BeladyPolicy(future), size,
                                              per_layer=per_layer).hits


@settings(max_examples=150, deadline=None)
@given(steps=step_lists(), per_layer=st.booleans(), limit=st.integers(1, 6))
def test_opt_cut_at_a_depth_is_exact_up_to_it(steps: Steps, per_layer: bool, limit: int) -> None:
    full, cut = opt_depths(steps, per_layer), opt_depths(steps, per_layer, limit)
    for size in range(max(1, largest_step(steps, per_layer)), limit + 1):
        assert hits_at(cut, size) == hits_at(full, size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 99), prefill=st.integers(0, 9), per_layer=st.booleans())
def test_compare_one_pass_equals_simulating(seed: int, prefill: int, per_layer: bool) -> None:
    """Every field of every row; sizes below the largest step (a prefill split in groups)
    are simulated either way."""
    trace = synthetic_trace(num_layers=3, num_experts=6, top_k=2, tokens=60, prefill=prefill,
                            seed=seed)
    kwargs = {"capacities": [2, 3, 4, 6], "per_layer": per_layer, "slots": [2, 5, 11, 18]}
    fast = compare(trace, ["lru", "opt", "lfu"], **kwargs)
    slow = compare(trace, ["lru", "opt", "lfu"], one_pass=False, **kwargs)
    assert [replace(r, method="") for r in fast] == [replace(r, method="") for r in slow]
    exact = largest_step(trace.access_steps(), per_layer)
    for row in fast:
        one_pass = row.policy != "lfu" and row.pool_slots >= largest_step(
            trace.access_steps(), row.pool == "layer")
        assert row.method == ("one-pass" if one_pass else "simulated"), (row, exact)


def test_curve_results_equal_simulate_per_layer_and_segment() -> None:
    trace = synthetic_trace(num_layers=4, num_experts=8, top_k=2, tokens=300, seed=5)
    steps = trace.access_steps()
    segments = [100, 500, len(steps) - 600]
    for per_layer, sizes in ((True, range(2, 9)), (False, range(2, 33))):
        future = FutureAccesses(flatten(steps))
        for name, factory in (("lru", LRUPolicy), ("opt", lambda f=future: BeladyPolicy(f))):
            curve = miss_curve(steps, name, per_layer=per_layer, segments=segments,
                               num_layers=4)
            for size in sizes:
                assert curve.result(size) == simulate(steps, factory, size, per_layer=per_layer,
                                                      num_layers=4, segments=segments)
            assert curve.misses()[sizes[0]] == curve.result(sizes[0]).misses


def test_a_curve_refuses_sizes_it_is_not_exact_at() -> None:
    steps = [[ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(0, 2)], [ExpertKey(0, 3)]]
    curve = miss_curve(steps, "opt", max_size=4)
    assert (curve.min_exact, curve.max_exact) == (3, 4)
    with pytest.raises(ValueError, match="exact from 3 to 4 slots, not at 2"):
        curve.result(2)
    with pytest.raises(ValueError, match="no one-pass curve for 'lfu'"):
        miss_curve(steps, "lfu")
    with pytest.raises(ValueError, match="depths are LRU's"):
        miss_curve(steps, "opt", depths=[0, 0, 0, 0])
    given = miss_curve(steps, "lru", depths=lru_depths(steps))  # depths the caller has already
    assert given == miss_curve(steps, "lru")


def test_recorded_traces_one_pass_equals_simulating(tiny_hf_checkpoint: Path) -> None:
    """Real routing, prefill in chunks of 4 (steps of up to 4 experts): the curves agree with
    the simulator wherever they claim exactness, both layouts, every size."""
    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2, prefetch=0,
                         prefill_chunk=4, max_seq_len=64) as rt:
        trace = record_trace(rt, None, [[1, 5, 9, 3, 7, 11, 2, 4, 6, 8], [5, 6, 7]], 12,
                             ignore_eos=True)
    fast = compare(trace, ["lru", "opt"], capacities=[2, 3, 4], slots=[2, 3, 4, 5, 6, 7, 8])
    slow = compare(trace, ["lru", "opt"], capacities=[2, 3, 4], slots=[2, 3, 4, 5, 6, 7, 8],
                   one_pass=False)
    assert [replace(r, method="") for r in fast] == [replace(r, method="") for r in slow]
    assert {r.method for r in fast} == {"one-pass", "simulated"}


def test_sweeping_every_size_of_a_global_pool() -> None:
    """A Mixtral-shaped trace (32 layers x 8 experts) swept over every global size in one
    call: both curves fall with the size (stack algorithms: a bigger pool holds what a smaller
    one does) down to the cold misses, opt's never above LRU's."""
    trace = synthetic_trace(SyntheticSpec(num_layers=32, num_experts=8, tokens=60, seed=2))
    rows = compare(trace, ["lru", "opt"], capacities=[], slots=range(2, 257), resamples=0)
    curves = {name: [r.misses for r in rows if r.policy == name] for name in ("lru", "opt")}
    cold = len(set(flatten(trace.access_steps())))
    for misses in curves.values():
        assert misses == sorted(misses, reverse=True) and misses[-1] == cold
    assert all(o <= lru for o, lru in zip(curves["opt"], curves["lru"]))
    assert all(r.method == "one-pass" for r in rows)


def test_a_sweep_builds_the_future_once_at_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep over every global size built opt's future (a pass over the whole trace) once per
    size even where the one-pass curve served opt: 13.5 of 26 s over 505 sizes of a 128-expert
    trace. The flattened accesses are the same at every size (groups keep the order), so it is
    built once, and only for a policy that is simulated."""
    import cache_policies.compare as compare_module

    built = []

    class Counting(FutureAccesses):
        def __init__(self, sequence: list[ExpertKey]) -> None:
            built.append(len(sequence))
            super().__init__(sequence)

    monkeypatch.setattr(compare_module, "FutureAccesses", Counting)
    trace = synthetic_trace(num_layers=4, num_experts=8, tokens=40, prefill=6, seed=3)
    compare(trace, ["lru", "opt"], capacities=[], slots=range(8, 33), resamples=0)
    assert built == []
    rows = compare(trace, ["opt", "static"], capacities=[2, 3], slots=[2, 5, 9], resamples=0)
    assert built == [len(flatten(trace.access_steps()))]
    for row in (r for r in rows if r.policy == "opt"):  # against a future built per size
        steps = trace.access_steps(row.pool_slots)
        future = FutureAccesses(flatten(steps))
        assert row.misses == simulate(steps, lambda f=future: BeladyPolicy(f), row.pool_slots,
                                      per_layer=row.pool == "layer").misses
