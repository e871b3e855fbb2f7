"""A recorded trace replayed through a policy gives exactly the runtime's hits and misses.

For a tiny checkpoint, every runtime policy, every capacity from top_k to all experts and both
pool layouts: run the offloaded runtime with tracing (prefetch off, two prompts, prefill in
chunks so small capacities acquire experts in several groups), then replay the trace at the
same capacity and compare hit and miss counts, in total and per layer, with what the runtime's
``EngineStats`` measured for each generation.

A group of experts is pinned as a whole while it is acquired, in the runtime and in the
simulator. (Until ``OffloadedExperts.acquire`` passed the group to ``ExpertCache.reserve``, a miss
early in a group could evict a resident expert later in the same group, which then missed too;
``test_replay_reproduces_runtime_counts`` failed at small capacities then.)
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import offload_rt
from cache_policies import ExpertKey, StaticPolicy, make_policy
from cache_policies.sim_report import replay
from cache_policies.trace import Trace, read_trace
from offload_rt.trace_recorder import record_trace

PROMPTS = [[1, 5, 9, 3, 7, 11, 2, 4, 6, 8], [5, 6, 7]]
NEW_TOKENS = 12  # per prompt: 24 generated tokens in all
CHUNK = 4  # prefill chunk: the first prompt runs as 3 forward calls
POLICIES = ("lru", "lfu", "lrfu", "router", "static", "test_trace_replay:HotStatic")


class HotStatic(StaticPolicy):
    """``static`` with a hot set, built with no arguments so the runtime can make it by path."""

    def __init__(self) -> None:
        super().__init__(ExpertKey(layer, e) for layer in range(2) for e in (0, 3))


def traced_run(model_dir: Path, policy: str, capacity: int, pool: str,
               **options: Any) -> tuple[Trace, int]:
    """The trace of the fixed prompts, and the runtime's pool size (its max_group)."""
    with offload_rt.load(model_dir, dtype="float32", cache_experts=capacity, policy=policy,
                         pool=pool, prefill_chunk=CHUNK, max_seq_len=64,
                         **{"prefetch": 0, **options}) as rt:
        trace = record_trace(rt, None, PROMPTS, NEW_TOKENS, ignore_eos=True, precision=None)
        assert rt.model._moe[0].experts is rt.experts, "record_trace must re-attach the runtime"
        return trace, rt.experts.max_group(0)


def measured(trace: Trace) -> tuple[int, int, Counter[int], Counter[int]]:
    """The runtime's device hits/misses summed over the generations (stats reset per call)."""
    hits, misses, layer_hits, layer_misses = 0, 0, Counter(), Counter()
    for seq in trace.header.sequences:
        m = seq["measured"]
        hits, misses = hits + m["hits"], misses + m["misses"]
        layer_hits.update({int(k): v for k, v in m["layer_hits"].items()})
        layer_misses.update({int(k): v for k, v in m["layer_misses"].items()})
    return hits, misses, layer_hits, layer_misses


def replayed(trace: Trace, policy: str, slots: int,
             pool: str) -> tuple[int, int, Counter[int], Counter[int]]:
    sim = replay(trace, lambda: make_policy(policy), slots, per_layer=pool == "layer").sim
    return sim.hits, sim.misses, Counter(sim.layer_hits), Counter(sim.layer_misses)


@pytest.mark.parametrize(("pool", "policy"), list(itertools.product(("layer", "global"), POLICIES)))
def test_replay_reproduces_runtime_counts(tiny_hf_checkpoint: Path, pool: str,
                                          policy: str) -> None:
    spec_experts, top_k = 4, 2  # TinySpec() defaults
    for capacity in range(top_k, spec_experts + 1):
        trace, slots = traced_run(tiny_hf_checkpoint, policy, capacity, pool)
        assert slots == (capacity if pool == "layer" else capacity * 2)
        assert trace.header.capacity == slots and trace.header.pool == pool
        expected = measured(trace)
        assert expected[0] + expected[1] == len(list(itertools.chain(*trace.access_steps())))
        assert replayed(trace, policy, slots, pool) == expected, capacity


def test_trace_layout_and_file_round_trip(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=3, prefetch=0,
                         prefill_chunk=CHUNK, max_seq_len=64) as rt:
        trace = record_trace(rt, tmp_path / "t.jsonl.gz", PROMPTS, 3, {"run": "test"},
                             ignore_eos=True)
    assert read_trace(tmp_path / "t.jsonl.gz") == trace
    h = trace.header
    assert (h.num_layers, h.num_experts, h.top_k, h.policy, h.prefetch) == (2, 4, 2, "lru", 0)
    assert h.expert_bytes == 3 * 32 * 48 * 4 and h.metadata["run"] == "test"
    assert [s["prompt_tokens"] for s in h.sequences] == [10, 3]
    calls = [(r.seq, r.step, r.pos, r.num_tokens) for r in trace.records if r.layer == 0]
    assert calls == [(0, 0, 0, 4), (0, 1, 4, 4), (0, 2, 8, 2), (0, 3, 10, 1), (0, 4, 11, 1),
                     (1, 5, 0, 3), (1, 6, 3, 1), (1, 7, 4, 1)]
    first = trace.records[0]
    assert len(first.probs) == 4 and len(first.probs[0]) == 4 and len(first.weights[0]) == 2
    assert all(abs(sum(w) - 1) < 1e-3 for w in first.weights)
    assert not any(r.predicted for r in trace.records)


def test_recorded_predictions_are_the_runtimes(tiny_hf_checkpoint: Path) -> None:
    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2, policy="router",
                         prefetch=1, prefill_chunk=CHUNK, max_seq_len=64) as rt:
        seen: list[dict[ExpertKey, float]] = []
        cache = rt.experts.device.cache
        original = cache.predict

        def spy(scores: dict[ExpertKey, float]) -> None:
            if scores:
                seen.append(dict(scores))
            original(scores)

        cache.predict = spy  # type: ignore[method-assign]
        trace = record_trace(rt, None, PROMPTS, 4, ignore_eos=True, precision=None)
        rt.experts.drain()
    recorded = [{ExpertKey(p.layer, e): prob for p in r.predicted for e, prob in
                 enumerate(p.probs)} for r in trace.records if r.predicted]
    assert recorded == seen and len(seen) == 2 * 3  # decode steps x layers with a next layer
    decode = [r for r in trace.records if r.num_tokens == 1 and r.layer == 0]
    assert all(r.predicted[0].layer == 1 and len(r.predicted[0].experts) == 2 for r in decode)


def test_tracing_an_offloaded_run_predicts_once_per_layer(tiny_hf_checkpoint: Path) -> None:
    """The recorder takes the engine's own predictions (``last_predictions``) instead of
    running the predictor a second time."""
    with offload_rt.load(tiny_hf_checkpoint, dtype="float32", cache_experts=2, prefetch=1,
                         prefill_chunk=CHUNK, max_seq_len=64) as rt:
        predictor = rt.experts.predictor
        calls = [0]
        original = predictor.predict

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return original(*args, **kwargs)

        predictor.predict = counting  # type: ignore[method-assign]
        rt.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
        untraced, calls[0] = calls[0], 0
        trace = record_trace(rt, None, PROMPTS[:1], 4, ignore_eos=True, precision=None)
        rt.experts.drain()
    assert untraced > 0 and calls[0] == untraced
    last = max(r.layer for r in trace.records)  # nothing lies beyond the last layer
    decode_records = [r for r in trace.records if r.num_tokens == 1 and r.layer < last]
    assert decode_records and all(r.predicted for r in decode_records)
