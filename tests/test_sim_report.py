"""Policy comparison on traces: opt is a bound, the replay hooks, the synthetic knobs, outputs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_policies import ExpertKey, LRUPolicy, make_policy, simulate
from cache_policies.sim_report import (
    _Replayer,
    compare,
    format_table,
    replay,
    rows_json,
)
from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from cache_policies.trace import Prediction, Record, Trace, TraceHeader, write_trace
from offload_rt.cli_simulate import add_simulate_parser, run_simulate
from offload_rt.errors import OptionError

ONLINE = ("lru", "lfu", "lrfu", "router", "static")


@st.composite
def specs(draw: st.DrawFn) -> SyntheticSpec:
    experts = draw(st.integers(2, 6))
    return SyntheticSpec(
        num_layers=draw(st.integers(1, 3)), num_experts=experts,
        top_k=draw(st.integers(1, min(experts, 3))), tokens=draw(st.integers(1, 40)),
        prefill=draw(st.integers(0, 6)), zipf=draw(st.floats(0.0, 3.0)),
        locality=draw(st.floats(0.0, 1.0)), layer_skew=draw(st.floats(0.0, 1.0)),
        predict_accuracy=draw(st.none() | st.floats(0.0, 1.0)), seed=draw(st.integers(0, 99)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), per_layer=st.booleans())
def test_opt_is_never_beaten(spec: SyntheticSpec, per_layer: bool) -> None:
    trace = synthetic_trace(spec)
    capacities = range(1, spec.num_experts + 1)
    rows = compare(trace, ["opt", *ONLINE], capacities, per_layer=per_layer)
    opt = {r.capacity: r for r in rows if r.policy == "opt"}
    for row in rows:
        assert row.misses >= opt[row.capacity].misses, row
        assert row.of_opt is None or row.of_opt <= 1.0
    assert all(r.of_opt == 1.0 for r in opt.values() if r.hits)


@settings(max_examples=25, deadline=None)
@given(spec=specs(), per_layer=st.booleans(), capacity=st.integers(1, 6))
def test_replay_loop_equals_simulate_without_hooks(spec: SyntheticSpec, per_layer: bool,
                                                   capacity: int) -> None:
    """The hooked loop (used for predictions/prefetch) has exactly the simulator's semantics."""
    trace = synthetic_trace(spec)
    steps = trace.access_steps(capacity)
    for name in ONLINE:
        expected = simulate(steps, lambda n=name: make_policy(n), capacity, per_layer=per_layer,
                            num_layers=spec.num_layers)
        got = _Replayer(lambda n=name: make_policy(n), capacity, per_layer,
                        spec.num_layers).run(trace.records, predictions=False,
                                             prefetch=False).sim
        assert got == expected


def two_layer_trace() -> Trace:
    """One decode token: layer 0 uses 0,1 and predicts layer 1 will use 2,3; it does."""
    pred = Prediction(1, (2, 3), (0.1, 0.1, 0.4, 0.4))
    return Trace(TraceHeader(2, 4, 2, expert_bytes=10), [
        Record(0, 0, 0, 0, ((0, 1),), predicted=(pred,)),
        Record(0, 0, 0, 1, ((2, 3),))])


class SpyPolicy(LRUPolicy):
    name = "spy"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object, int]] = []

    def on_predict(self, scores: object, now: int) -> None:
        self.calls.append(("predict", dict(scores), now))  # type: ignore[call-overload]

    def on_access(self, key: ExpertKey, now: int) -> None:
        super().on_access(key, now)
        self.calls.append(("access", key, now))


def test_predictions_reach_the_policy_before_the_layer_runs() -> None:
    spies: list[SpyPolicy] = []

    def factory() -> SpyPolicy:
        spies.append(SpyPolicy())
        return spies[-1]

    replay(two_layer_trace(), factory, 4, per_layer=False)
    (spy,) = spies[1:]  # the first instance only told replay the policy uses predictions
    scores = {ExpertKey(1, e): p for e, p in enumerate((0.1, 0.1, 0.4, 0.4))}
    assert spy.calls[0] == ("predict", scores, 0)
    assert [c[0] for c in spy.calls[1:]] == ["access"] * 4


def test_modelled_prefetch_turns_predicted_misses_into_hits() -> None:
    trace = two_layer_trace()
    plain = replay(trace, LRUPolicy, 2)
    fetched = replay(trace, LRUPolicy, 2, prefetch=True)
    assert (plain.sim.hits, plain.sim.misses) == (0, 4)
    assert (fetched.sim.hits, fetched.sim.misses) == (2, 2)
    assert (fetched.prefetch_inserts, fetched.prefetch_useful, fetched.prefetch_wasted) == (2, 2, 0)
    # One global pool of 2 slots: making room would evict layer 0's experts, which the
    # prefetcher must not touch (the runtime protects the current layer's experts).
    assert replay(trace, LRUPolicy, 2, per_layer=False, prefetch=True).prefetch_inserts == 0
    row = compare(trace, ["lru"], [2], prefetch=True)[0]
    assert row.bytes_per_token == (2 + 2) * 10 / 1


def test_a_group_is_pinned_while_it_is_acquired() -> None:
    # Pool of 2 holding {1, 2} (2 used last). Group [0, 1]: LRU alone would evict 1, but the
    # group needs it, so the miss on 0 evicts 2 and 1 hits (the runtime protects the group too).
    trace = Trace(TraceHeader(1, 3, 2), [Record(0, 0, 0, 0, ((1, 2),)),
                                         Record(1, 0, 1, 0, ((2,),)),
                                         Record(2, 0, 2, 0, ((0, 1),))])
    result = replay(trace, LRUPolicy, 2, prefetch=True).sim  # prefetch: the hooked loop
    assert (result.hits, result.misses) == (2, 3)
    assert result == replay(trace, LRUPolicy, 2).sim  # the simulator's


def test_compare_rows_and_outputs() -> None:
    trace = synthetic_trace(num_layers=2, num_experts=4, tokens=50, expert_bytes=1000)
    rows = compare(trace, ["lru", "opt", "static"], [2, 3], label="syn")
    assert [(r.policy, r.capacity) for r in rows] == [
        ("lru", 2), ("opt", 2), ("static", 2), ("lru", 3), ("opt", 3), ("static", 3)]
    for r in rows:
        assert r.hits + r.misses == r.accesses and sum(r.layer_hits.values()) == r.hits
        assert r.bytes_per_token == r.misses * 1000 / 50 and r.tokens == 50
    table = format_table(rows, per_layer=True)
    # The size column says slots for either layout ("2 per layer", "24 total"): issue 17.
    assert table.splitlines()[0].split()[:4] == ["trace", "pool", "slots", "policy"]
    assert "L1:" in table and table.count("syn ") == 6
    data = json.loads(rows_json(rows))["rows"]
    assert data[1]["policy"] == "opt" and data[1]["of_opt"] == 1.0
    assert set(data[0]["per_layer"]) == {"0", "1"}
    global_rows = compare(trace, ["lru"], [2], per_layer=False)
    assert global_rows[0].pool_slots == 4 and global_rows[0].pool == "global"


def test_compare_accepts_bare_steps() -> None:
    a, b, c = (ExpertKey(0, e) for e in range(3))
    steps = [[a, b], [c, a], [b]]
    rows = compare(steps, ["lru", "opt"], [2])
    assert rows[0].misses == simulate(steps, LRUPolicy, 2).misses
    assert rows[0].bytes_per_token is None
    with pytest.raises(ValueError, match="unknown cache policy 'nope'"):
        compare(steps, ["nope"], [2])


def test_synthetic_is_deterministic_and_seeded() -> None:
    spec = SyntheticSpec(num_layers=3, num_experts=8, tokens=100, prefill=5, seed=3,
                         predict_accuracy=0.5)
    assert synthetic_trace(spec) == synthetic_trace(spec)
    assert synthetic_trace(spec).records != synthetic_trace(replace(spec, seed=4)).records
    trace = synthetic_trace(spec)
    unpredicted = synthetic_trace(replace(spec, predict_accuracy=None))
    assert [r.experts for r in unpredicted.records] == [r.experts for r in trace.records]
    assert trace.has_predictions and not unpredicted.has_predictions
    assert trace.num_tokens == 105 and len(trace.records) == 101 * 3
    assert all(len(set(tok)) == 2 for r in trace.records for tok in r.experts)
    with pytest.raises(ValueError):
        SyntheticSpec(top_k=9)


def lru_hit_rate(**knobs: object) -> float:
    trace = synthetic_trace(num_layers=2, num_experts=8, tokens=600, seed=1, **knobs)
    return replay(trace, LRUPolicy, 3).sim.hit_rate


def test_synthetic_knobs_move_the_hit_rate() -> None:
    assert lru_hit_rate(locality=0.9) > lru_hit_rate(locality=0.5) > lru_hit_rate(locality=0.0)
    assert lru_hit_rate(zipf=2.0, locality=0.0) > lru_hit_rate(zipf=0.0, locality=0.0)
    skewed = replay(synthetic_trace(num_layers=2, num_experts=8, tokens=600, locality=0.0,
                                    zipf=1.5, layer_skew=1.0), LRUPolicy, 3).sim
    rates = [skewed.layer_hits[i] / (skewed.layer_hits[i] + skewed.layer_misses[i])
             for i in (0, 1)]
    assert rates[1] > rates[0] + 0.1  # layer 0 is uniform, the last layer twice as skewed


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from cache_policies.plot import plot_hit_rates

    rows = compare(synthetic_trace(num_layers=2, num_experts=4, tokens=30), ["lru", "opt"],
                   [2, 3, 4])
    out = plot_hit_rates(rows, tmp_path / "hr.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    from cache_policies.plot import plot_hit_rates

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails
    with pytest.raises(RuntimeError, match=r"pip install 'offload_rt\[plot\]'"):
        plot_hit_rates([], tmp_path / "x.png")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="offload-rt")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["simulate", *argv])
    assert args.run is run_simulate
    return run_simulate(args)


SYNTHETIC = ["--synthetic", "--layers", "2", "--experts", "4", "--tokens", "40"]


def test_cli_prints_a_table_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_cli([*SYNTHETIC, "--policies", "lru,opt", "--capacity", "2,3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["trace", "pool", "slots", "policy"] and len(lines) == 5
    saved = tmp_path / "syn.jsonl.gz"
    assert run_cli([*SYNTHETIC, "--json", "--save-trace", str(saved)]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]
    assert {r["policy"] for r in rows} == {"lru", "lfu", "lrfu", "router", "opt", "static"}
    assert run_cli([str(saved), "--json", "--pool", "global", "--prefetch"]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]
    assert again[0]["trace"] == "syn.jsonl.gz" and again[0]["pool"] == "global"
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert run_cli([*SYNTHETIC, "--plot", str(tmp_path / "p.png")]) == 0
        assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_errors_are_option_errors(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="TRACE files or --synthetic"):
        run_cli([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "nope"}\n')
    with pytest.raises(OptionError, match=str(bad)):
        run_cli([str(bad)])
    with pytest.raises(OptionError, match="unknown cache policy"):
        run_cli([*SYNTHETIC, "--policies", "nope"])
    write_trace(tmp_path / "ok.jsonl", synthetic_trace(num_layers=1, num_experts=2, tokens=3))
    with pytest.raises(SystemExit):
        run_cli([str(tmp_path / "ok.jsonl"), "--capacity", "0"])
