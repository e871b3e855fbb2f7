"""``offload-rt trace-stats`` and ``cache_policies.trace_stats`` (issue 17, item 3): reuse
distances, per-layer popularity and sharing, prediction precision and recall by target layer
and lookahead, one-pass miss-ratio curves; table, JSON and plots, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cache_policies import BeladyPolicy, ExpertKey, FutureAccesses, LRUPolicy, flatten, simulate
from cache_policies.prediction_stats import prediction_stats
from cache_policies.stats_output import stats_dict, stats_table
from cache_policies.synthetic import synthetic_trace
from cache_policies.trace import Prediction, Record, Trace, TraceHeader, write_trace
from cache_policies.trace_stats import layer_stats, reuse_stats, spread, trace_stats
from offload_rt.cli import main


def hand_trace() -> Trace:
    """One layer-0 expert sequence A B A C B (one token per call), layer 1 and predictions:
    at layer 0, 1 ahead (layer 1) and 2 ahead (layer 2)."""
    header = TraceHeader(3, 4, 1, sequences=[{"prompt_tokens": 0}])
    experts = [0, 1, 0, 2, 1]
    records = []
    for step, e in enumerate(experts):
        guesses = (Prediction(1, (e,)), Prediction(2, (3,)))  # layer 1 right, layer 2 wrong
        records += [Record(step, 0, step, 0, ((e,),), predicted=guesses),
                    Record(step, 0, step, 1, ((e,),)), Record(step, 0, step, 2, ((step % 2,),))]
    return Trace(header, records)


def test_reuse_distances_by_hand() -> None:
    stats = reuse_stats(hand_trace(), per_layer=True)
    # Layer 0: A B A C B -> reuses of A at 1 (B between), B at 2 (A, C between);
    # layer 1 the same; layer 2: 0 1 0 1 0 -> three reuses at distance 1.
    assert stats.first_uses == 3 + 3 + 2 and stats.accesses == 15
    assert stats.histogram == {1: 2 + 3, 2: 2}
    assert stats.quantiles == {"p50": 1, "p90": 2, "p99": 2}
    assert stats.lru_misses[1] == 15 and stats.lru_misses[3] == 8


def test_curves_are_the_simulators() -> None:
    trace = synthetic_trace(num_layers=3, num_experts=6, top_k=2, tokens=120, seed=7)
    steps = trace.access_steps()
    future = FutureAccesses(flatten(steps))
    for per_layer in (True, False):
        stats = reuse_stats(trace, per_layer)
        for size, misses in stats.lru_misses.items():
            assert misses == simulate(steps, LRUPolicy, size, per_layer=per_layer).misses
        for size, misses in stats.opt_misses.items():
            assert misses == simulate(steps, lambda: BeladyPolicy(future), size,
                                      per_layer=per_layer).misses


def test_popularity_and_sharing() -> None:
    layers = layer_stats(hand_trace())
    assert layers[0].picks == (2, 2, 1, 0) and layers[0].tokens == 5
    assert layers[0].sharing == 0.0  # consecutive tokens never share at layer 0
    assert layers[2].picks == (3, 2, 0, 0) and layers[2].sharing == 0.0
    assert layers[0].sharing_uniform == pytest.approx(1 / 4)  # 1 - C(3,1)/C(4,1)
    assert 0 < layers[0].entropy < 1
    same = Trace(TraceHeader(1, 8, 2), [Record(i, 0, i, 0, ((1, 2),)) for i in range(4)])
    assert layer_stats(same)[0].sharing == 1.0
    assert layer_stats(same)[0].sharing_uniform == pytest.approx(1 - 15 / 28)


def test_prediction_precision_and_recall_by_layer_and_lookahead() -> None:
    stats = prediction_stats(hand_trace())
    assert stats.by_target[1].precision == 1.0 and stats.by_target[1].predictions == 5
    # Layer 2 uses 0 or 1, the guess is always 3: never right.
    assert stats.by_target[2].precision == 0.0 and stats.by_lookahead[2].recall == 0.0
    assert stats.by_lookahead[1].precision == 1.0
    assert stats.overall.precision == 0.5 and stats.unmatched == 0
    two = Trace(TraceHeader(2, 4, 2), [Record(0, 0, 0, 0, ((0, 1),),
                                              predicted=(Prediction(1, (2, 3, 0)),)),
                                       Record(0, 0, 0, 1, ((2, 1),))])
    score = prediction_stats(two).overall
    assert (score.precision, score.recall) == (pytest.approx(1 / 3), 0.5)


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_json_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, synthetic_trace(num_layers=3, num_experts=6, top_k=2, tokens=50,
                                      predict_accuracy=0.6, sequences=2))
    code, out, err = cli(capsys, "trace-stats", path)
    assert code == 0, err
    for needle in ("reuse distance", "miss ratio by slots per pool", "layer   ", "global",
                   "sharing", "layer 1", "1 ahead", "overall"):
        assert needle in out
    code, out, _ = cli(capsys, "trace-stats", path, "--json", "--zipf", "2")
    data = json.loads(out)
    entry = data["traces"][0]
    assert entry["trace"] == "t.jsonl" and entry["shape"]["sequences"] == 2
    assert {r["pool"] for r in entry["reuse"]} == {"layer", "global"}
    assert set(entry["predictions"]["by_target"]) == {"1", "2"}
    assert entry["reuse"][0]["miss_ratio"]["opt"]["2"] <= entry["reuse"][0]["miss_ratio"]["lru"]["2"]
    assert data["notes"] == ["--zipf: no effect without --synthetic (TRACE files were given)"]
    pytest.importorskip("matplotlib")
    code, _, err = cli(capsys, "trace-stats", path, path, "--plot", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_without_predictions_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "trace-stats", "--synthetic", "--layers", "2", "--experts", "4",
                       "--tokens", "20")
    assert code == 0 and "predictions: none recorded" in out


def test_trace_stats_imports_no_torch() -> None:
    probe = ("import contextlib, io, sys\nfrom offload_rt.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             "    code = main(['trace-stats', '--synthetic', '--layers', '2', '--experts', '4',"
             " '--tokens', '20', '--json'])\n"
             "print(code, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0 []"


def test_keys_of_other_layers_do_not_count_as_reuse_in_per_layer_pools() -> None:
    trace = Trace(TraceHeader(2, 2, 1), [Record(0, 0, 0, 0, ((0,),)), Record(0, 0, 0, 1, ((0,),)),
                                         Record(1, 0, 1, 0, ((0,),))])
    assert reuse_stats(trace, per_layer=True).histogram == {0: 1}
    assert reuse_stats(trace, per_layer=False).histogram == {1: 1}
    assert ExpertKey(0, 0) != ExpertKey(1, 0)


def test_curves_reach_down_to_top_k_past_a_prefill() -> None:
    """A prefill chunk acquires every expert of a layer at once, so one-pass curves are exact
    only from the number of experts up: the per-layer curve of the demo trace was one point
    (8 slots). Smaller pools split the chunk into groups; those sizes are simulated."""
    trace = synthetic_trace(num_layers=3, num_experts=6, top_k=2, tokens=60, prefill=20,
                            seed=7)
    for per_layer, top in ((True, 6), (False, 18)):
        stats = reuse_stats(trace, per_layer)
        assert min(stats.lru_misses) == 2 and min(stats.opt_misses) == 2
        assert stats.simulated == (2, 3, 4, 5)  # one layer's 6 experts in one step
        for size in [*stats.simulated, top]:
            steps = trace.access_steps(size)
            future = FutureAccesses(flatten(steps))
            assert stats.lru_misses[size] == simulate(steps, LRUPolicy, size,
                                                      per_layer=per_layer).misses
            assert stats.opt_misses[size] == simulate(steps, lambda f=future: BeladyPolicy(f),
                                                      size, per_layer=per_layer).misses
    data = stats_dict("t", "", trace, trace_stats(trace))
    assert data["reuse"][0]["simulated_sizes"] == [2, 3, 4, 5]
    assert "2*: " in stats_table("t", trace, trace_stats(trace))


def test_simulated_sizes_are_spread_on_a_log_scale() -> None:
    assert spread(range(2, 8), 8) == [2, 3, 4, 5, 6, 7]
    assert spread(range(8, 128), 8) == [8, 12, 18, 26, 39, 58, 86, 127]
    assert spread(range(3, 3), 8) == []
