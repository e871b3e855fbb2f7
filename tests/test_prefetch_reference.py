"""``opt+prefetch``, the reference for rows with modelled prefetch, and the flags and notes that
say what an option did (issue 17, item 4): with ``--prefetch`` a policy reached 7.68 "of opt"
with no flag, and there was no prefetch-aware reference.

The reference is the optimum of a relaxed problem (``cache_policies.prefetch_reference``):
checked here against an exhaustive search over every load and eviction choice, and against
every policy under the modelled prefetch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_policies import BeladyPolicy, ExpertKey, FutureAccesses, flatten, make_policy
from cache_policies.compare import compare
from cache_policies.prefetch_reference import NAME, prefetch_reference
from cache_policies.replay import replay
from cache_policies.sim_output import format_table
from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from cache_policies.trace import Prediction, Record, Trace, TraceHeader, write_trace
from offload_rt.cli import main

Event = tuple[str, ExpertKey, frozenset[ExpertKey]]


@st.composite
def small_traces(draw: st.DrawFn) -> tuple[Trace, int]:
    layers, experts = draw(st.integers(1, 2)), draw(st.integers(2, 5))
    top_k = draw(st.integers(1, min(2, experts)))
    records = []
    for step in range(draw(st.integers(1, 6))):
        tokens = draw(st.sampled_from([1, 1, 1, 2]))
        for layer in range(layers):
            rows = tuple(tuple(draw(st.permutations(range(experts)))[:top_k])
                         for _ in range(tokens))
            guess = ()
            if tokens == 1 and draw(st.booleans()):
                target = draw(st.integers(0, layers - 1))
                picked = draw(st.lists(st.integers(0, experts - 1), min_size=1,
                                       max_size=top_k, unique=True))
                guess = (Prediction(target, tuple(picked)),)
            records.append(Record(step, 0, step, layer, rows, predicted=guess))
    capacity = draw(st.integers(top_k, top_k + 2))
    return Trace(TraceHeader(layers, experts, top_k), records), capacity


def events(trace: Trace, capacity: int) -> list[Event]:
    """Demand accesses (pinned with their group) and free-load chances, in replay order."""
    out: list[Event] = []
    for record in trace.records:
        for group in record.groups(capacity):
            out += [("use", key, frozenset(group)) for key in group]
        out += [("free", ExpertKey(p.layer, e), frozenset()) for p in record.predicted
                for e in p.experts]
    return out


def fewest_misses(trace: Trace, capacity: int, per_layer: bool) -> int:
    """Exhaustive search: every eviction on a miss, every load-or-skip on a free chance."""
    timeline = events(trace, capacity)

    def pool(key: ExpertKey) -> int:
        return key.layer if per_layer else 0

    @functools.cache
    def best(i: int, resident: frozenset[ExpertKey]) -> int:
        if i == len(timeline):
            return 0
        kind, key, pinned = timeline[i]
        if key in resident:
            return best(i + 1, resident)
        mine = [k for k in resident if pool(k) == pool(key)]
        full = len(mine) >= capacity
        loads = [resident | {key}] if not full else [
            (resident - {v}) | {key} for v in mine if v not in pinned]
        if kind == "use":
            return 1 + min(best(i + 1, r) for r in loads)
        return min([best(i + 1, resident)] + [best(i + 1, r) for r in loads])

    return best(0, frozenset())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=small_traces(), per_layer=st.booleans())
def test_the_reference_is_the_optimum_of_free_loads(case: tuple[Trace, int],
                                                    per_layer: bool) -> None:
    trace, capacity = case
    reference = prefetch_reference(trace, capacity, per_layer=per_layer).sim
    assert reference.misses == fewest_misses(trace, capacity, per_layer)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 99), accuracy=st.floats(0.0, 1.0), per_layer=st.booleans(),
       capacity=st.integers(2, 5))
def test_no_policy_with_prefetch_beats_the_reference(seed: int, accuracy: float,
                                                     per_layer: bool, capacity: int) -> None:
    trace = synthetic_trace(SyntheticSpec(num_layers=3, num_experts=5, tokens=40, prefill=3,
                                          predict_accuracy=accuracy, seed=seed))
    size = capacity if per_layer else capacity * 3
    bound = prefetch_reference(trace, size, per_layer=per_layer).sim.misses
    future = FutureAccesses(flatten(trace.access_steps(size)))
    factories = {name: (lambda n=name: make_policy(n)) for name in ("lru", "lfu", "lrfu",
                                                                     "router", "static")}
    factories["opt"] = lambda: BeladyPolicy(future)
    for name, factory in factories.items():
        result = replay(trace, factory, size, per_layer=per_layer, prefetch=True).sim
        assert result.misses >= bound, name


def predicted_trace() -> Trace:
    return synthetic_trace(SyntheticSpec(num_layers=4, num_experts=8, tokens=200,
                                         predict_accuracy=0.9, sequences=3, seed=1))


def test_rows_above_opt_are_flagged_and_set_against_the_reference() -> None:
    rows = compare(predicted_trace(), ["lru", "router", "opt"], [2, 4], prefetch=True)
    by = {(r.policy, r.capacity): r for r in rows}
    assert {r.policy for r in rows} == {"lru", "router", "opt", NAME}
    above = [r for r in rows if r.above_opt]
    assert above and all(r.hit_rate > by[("opt", r.capacity)].hit_rate for r in above)
    for row in rows:
        if row.policy not in ("opt", NAME):
            assert row.prefetch and row.reference == NAME and row.of_opt <= 1.0
    assert by[("opt", 2)].reference == "opt" and not by[("opt", 2)].above_opt
    table = format_table(rows)
    assert "^" in table and "above opt, the demand-paging optimum" in table
    assert "'of opt' is the fraction of opt+prefetch" in table


def test_without_prefetch_there_is_no_reference_row() -> None:
    rows = compare(predicted_trace(), ["lru", "opt"], [2])
    assert [r.policy for r in rows] == ["lru", "opt"] and not any(r.above_opt for r in rows)


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_options_without_effect_are_noted(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, synthetic_trace(num_layers=2, num_experts=4, tokens=20))
    code, out, _ = cli(capsys, "simulate", path, "--policies", "lru", "--slots", "4",
                       "--pool", "layer", "--zipf", "2", "--seed", "3", "--json", "--per-layer")
    notes = json.loads(out)["notes"]
    assert code == 0
    assert "--zipf, --seed: no effect without --synthetic (TRACE files were given)" in notes
    assert any(n.startswith("--pool layer: no effect") for n in notes)
    assert any(n.startswith("--per-layer: no effect with --json") for n in notes)
    code, out, _ = cli(capsys, "simulate", path, "--policies", "lru", "--capacity", "2",
                       "--prefetch")
    assert "the modelled --prefetch loaded nothing" in out
    # opt alone is never prefetched: the flag still did nothing, and a note says so
    code, out, _ = cli(capsys, "simulate", path, "--policies", "opt", "--capacity", "2",
                       "--prefetch")
    assert code == 0
    assert "t.jsonl: --prefetch: no effect: the trace holds no predictions" in out
