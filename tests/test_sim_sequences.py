"""Per-sequence and per-phase counts, bootstrap intervals, and the JSON report (issue 17,
items 2 and 5): one number per row hid a spread as large as the gaps between policies; the
JSON dropped ``prefetch_wasted``, had no per-sequence or prefill/decode split, never set the
recorded run against its replay, listed only layers with hits, and gave only a base name."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import offload_rt
from cache_policies import LRUPolicy, make_policy
from cache_policies.bootstrap import Bootstrap, mean_ci, percentile_interval
from cache_policies.compare import compare
from cache_policies.live import live_check
from cache_policies.replay import replay
from cache_policies.segments import DECODE, PREFILL, trace_segments
from cache_policies.synthetic import synthetic_trace
from cache_policies.trace import Record, Trace, TraceHeader, write_trace
from offload_rt.cli import main
from offload_rt.engine.stats import EngineStats
from offload_rt.trace_recorder import measured_stats, record_trace


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def several() -> Trace:
    return synthetic_trace(num_layers=3, num_experts=8, tokens=30, prefill=6, sequences=12,
                           seed=4, predict_accuracy=0.7, expert_bytes=100)


def test_bootstrap_intervals() -> None:
    boot = Bootstrap(5, resamples=500, seed=1)
    hits, accesses = [5, 7, 2, 9, 4], [10, 10, 10, 10, 10]
    low, high = boot.ratio_ci(hits, accesses)  # type: ignore[misc]
    assert low < sum(hits) / sum(accesses) < high
    assert boot.ratio_ci(hits, accesses) == Bootstrap(5, 500, seed=1).ratio_ci(hits, accesses)
    assert Bootstrap(1).ratio_ci([1], [2]) is None
    assert boot.ratio_ci([1] * 5, [0] * 5) is None
    assert percentile_interval(list(range(1, 101))) == (3, 98)
    mean, ci = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and ci == pytest.approx((0.6 - 4.303 * 0.1 / 3 ** 0.5,
                                                              0.6 + 4.303 * 0.1 / 3 ** 0.5))
    assert mean_ci([0.5]) == (0.5, None)


def test_rows_carry_intervals_sequences_and_phases() -> None:
    trace = several()
    rows = compare(trace, ["lru", "lfu", "opt"], [2, 4])
    for row in rows:
        low, high = row.ci["hit_rate"]
        assert low <= row.hit_rate <= high and row.ci["of_opt"][0] <= row.of_opt <= \
            row.ci["of_opt"][1]
        assert "decode_hit_rate" in row.ci
        seqs = row.sequences()
        assert [s["seq"] for s in seqs] == list(range(12))
        assert sum(s["hits"] for s in seqs) == row.hits and sum(
            s["misses"] for s in seqs) == row.misses
        prefill, decode = row.phase(PREFILL), row.phase(DECODE)
        assert prefill["hits"] + decode["hits"] == row.hits
        assert (prefill["tokens"], decode["tokens"]) == (12 * 6, 12 * 30)
    assert not compare(synthetic_trace(num_layers=2, num_experts=4, tokens=20), ["lru"],
                       [2])[0].ci  # one sequence: no interval


def test_a_sequences_counts_are_what_the_runtime_measures_for_it() -> None:
    """Per sequence, a continuous replay counts what happened during that sequence, the cache
    carrying over: the first k sequences' hits equal a replay of the trace cut after them."""
    trace = several()
    row = compare(trace, ["lfu"], [3])[0]
    running = 0
    for k, seq in enumerate(row.sequences(), start=1):
        running += seq["hits"]
        cut = Trace(trace.header, [r for r in trace.records if r.seq < k])
        assert replay(cut, lambda: make_policy("lfu"), 3).sim.hits == running


def test_phases_follow_the_prompt_length_not_the_chunking() -> None:
    """A prompt fed one token per call (prefill_chunk=1) is still prefill: the phase comes
    from the header's prompt_tokens, so decode figures compare across chunkings."""
    header = TraceHeader(1, 4, 1, sequences=[{"prompt_tokens": 3}])
    trace = Trace(header, [Record(i, 0, i, 0, ((e,),)) for i, e in enumerate([0, 1, 0, 1, 2])])
    assert [(s.phase, s.records, s.tokens) for s in trace_segments(trace)] == [
        (PREFILL, 3, 3), (DECODE, 2, 2)]
    row = compare(trace, ["lru"], [2])[0]
    assert row.phase(PREFILL)["misses_per_token"] == pytest.approx(2 / 3)
    assert row.phase(DECODE) == {"hits": 1, "misses": 1, "tokens": 2, "hit_rate": 0.5,
                                 "misses_per_token": 0.5}


def test_the_table_shows_intervals_and_phases(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    write_trace(tmp_path / "s.jsonl", several())
    code, out, _ = cli(capsys, "simulate", tmp_path / "s.jsonl", "--policies", "lru,opt",
                       "--capacity", "2")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[4:10] == ["hit", "rate", "95%", "CI", "of", "opt"]
    assert header[10:12] == ["decode", "prefill"]
    assert "bootstrap over the trace's sequences (12 sequences)" in out
    code, out, _ = cli(capsys, "simulate", tmp_path / "s.jsonl", "--policies", "lru",
                       "--capacity", "2", "--resamples", "0")
    assert "95% CI" not in out


def test_json_has_what_it_lacked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_trace(tmp_path / folder / "run.jsonl", several())
    code, out, _ = cli(capsys, "simulate", tmp_path / "a" / "run.jsonl",
                       tmp_path / "b" / "run.jsonl", "--policies", "lru", "--capacity", "2",
                       "--prefetch", "--json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["trace"] for r in rows[::2]] == ["a/run.jsonl", "b/run.jsonl"]
    assert rows[0]["trace_path"] == str(tmp_path / "a" / "run.jsonl")
    lru = rows[0]
    assert lru["prefetch_inserts"] == lru["prefetch_useful"] + lru["prefetch_wasted"] + \
        _still_resident(several())
    assert lru["prefetch_wasted"] > 0
    assert len(lru["sequences"]) == 12 and set(lru["sequences"][0]) >= {
        "seq", "hits", "misses", "tokens", "hit_rate", PREFILL, DECODE}
    assert lru[DECODE]["tokens"] == 360 and lru["ci"]["hit_rate"][0] <= lru["hit_rate"]


def _still_resident(trace: Trace) -> int:
    """Prefetched experts neither used nor evicted by the end (LRU, 2 slots per layer)."""
    result = replay(trace, LRUPolicy, 2, prefetch=True)
    return result.prefetch_inserts - result.prefetch_useful - result.prefetch_wasted


def test_measured_counts_list_every_layer() -> None:
    stats = EngineStats()
    stats.layer_hits = Counter({0: 3})
    stats.layer_misses = Counter({0: 1, 2: 4})
    measured = measured_stats(stats, num_layers=4)
    assert measured["layer_hits"] == {"0": 3, "1": 0, "2": 0, "3": 0}
    assert measured["layer_misses"] == {"0": 1, "1": 0, "2": 4, "3": 0}


def test_the_recorded_run_is_set_against_its_replay(tiny_hf_checkpoint: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2, prefetch=0,
                         prefill_chunk=4, max_seq_len=64) as rt:
        trace = record_trace(rt, tmp_path / "t.jsonl", [[1, 5, 9, 3, 7], [5, 6, 7]], 6,
                             ignore_eos=True)
    assert all(set(s["measured"]["layer_hits"]) == {"0", "1"} for s in trace.header.sequences)
    check = live_check(trace, "t.jsonl")
    assert check is not None and check["exact"] and check["expected_exact"]
    assert check["measured"]["per_sequence"] == [
        [s["measured"]["hits"], s["measured"]["misses"]] for s in trace.header.sequences]
    code, out, _ = cli(capsys, "simulate", tmp_path / "t.jsonl", "--policies", "lru",
                       "--capacity", "2", "--json")
    assert json.loads(out)["live"][0]["exact"] is True
    code, out, _ = cli(capsys, "simulate", tmp_path / "t.jsonl", "--policies", "lru",
                       "--capacity", "2")
    assert code == 0
    assert "the recorded run (lru, 2 per layer, prefetch 0)" in out
    assert "its replay gives the same, sequence by sequence" in out
    assert live_check(synthetic_trace(num_layers=1, num_experts=2, tokens=3)) is None


def test_a_paired_interval_for_the_gap_between_two_policies() -> None:
    """The hit-rate spread over sequences is as large as the gap between policies, so their
    separate intervals overlap; the gap's own interval, on the same resamples, is narrower
    (the sequences that are hard for one policy are hard for the other)."""
    trace = several()
    rows = {r.policy: r for r in compare(trace, ["lru", "lfu", "opt"], [3])}
    per_seq = {name: row.sequences() for name, row in rows.items()}
    hits = {name: [s["hits"] for s in seqs] for name, seqs in per_seq.items()}
    accesses = [s["hits"] + s["misses"] for s in per_seq["lru"]]
    boot = Bootstrap(len(accesses), resamples=2000)
    low, high = boot.difference_ci(hits["opt"], accesses, hits["lru"], accesses)
    gap = rows["opt"].hit_rate - rows["lru"].hit_rate
    assert 0 < low <= gap <= high  # opt above lru, and the interval says so
    assert high - low < (rows["lru"].ci["hit_rate"][1] - rows["lru"].ci["hit_rate"][0])
    assert boot.difference_ci(hits["lru"], accesses, hits["lru"], accesses) == (0.0, 0.0)
    assert Bootstrap(1).difference_ci([1], [2], [1], [2]) is None
