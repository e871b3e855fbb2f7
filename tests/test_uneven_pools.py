"""Per-layer pools of unequal capacity: the slots a budget leaves after equal pools are used.

Equal per-layer pools round down (``budget // (layers x slot)``); the R < layers whole slots
left over go one each to layers 0 .. R-1 (``budget.spare_slots``, ``pool_capacities``), so a
plan still never exceeds its budget. The cache, the runtime's group size (``max_group``), the
start-up line, a recorded trace and its replay all follow the unequal pools. Bit-exactness with
unequal pools: ``tests/test_engine_exactness.py`` (the ``uneven`` cases).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies import ExpertKey, LRUPolicy, make_policy, simulate
from cache_policies.live import live_check
from cache_policies.trace import read_trace
from offload_rt.bench import planned_bytes
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.budget import Footprint, footprint, plan_memory, slots_text
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.trace_recorder import record_trace

SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=21)
MAX_SEQ = 64
CHUNK = 4  # small prefill chunks: a layer's experts are acquired in groups of its pool's size
PROMPTS = [[1, 5, 9, 3, 7, 11, 2, 4, 6, 8], [5, 6, 7]]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("uneven"), SPEC)


def _footprint(model_dir: Path) -> Footprint:
    return footprint(Checkpoint.open(model_dir).config, torch.float32, MAX_SEQ, CHUNK)


def _budget(fp: Footprint, per_layer: int, spare: int) -> int:
    """Room for ``per_layer`` slots in every layer, ``spare`` more and a slot's bytes less 1."""
    return fp.fixed + (per_layer * SPEC.num_layers + spare + 1) * fp.slot - 1


@pytest.mark.parametrize("per_layer", [SPEC.top_k, 5])
@pytest.mark.parametrize("spare", range(SPEC.num_layers))
def test_leftover_slots_go_to_the_first_layers(model_dir: Path, per_layer: int,
                                               spare: int) -> None:
    cfg, fp = Checkpoint.open(model_dir).config, _footprint(model_dir)
    budget = _budget(fp, per_layer, spare)
    plan = plan_memory(cfg, fp, CPU, device_budget=budget, host_budget=None,
                       cache_experts=None, per_layer=None)
    want = (per_layer + 1,) * spare + (per_layer,) * (SPEC.num_layers - spare)
    assert plan.pool_capacities == want
    assert plan.device_slots == sum(want) == per_layer * SPEC.num_layers + spare
    assert fp.fixed + plan.device_slots * fp.slot <= budget  # the plan is still a promise
    assert budget - fp.fixed - plan.device_slots * fp.slot < fp.slot  # no whole slot unused


def test_no_spare_slots_where_the_pools_are_fixed(model_dir: Path) -> None:
    """--cache-experts fixes every pool; a global pool takes every slot anyway; a pool of all
    its layer's experts cannot grow."""
    cfg, fp = Checkpoint.open(model_dir).config, _footprint(model_dir)
    budget = _budget(fp, 3, SPEC.num_layers - 1)

    def plan(**kw: object) -> tuple[int, ...]:
        return plan_memory(cfg, fp, CPU, device_budget=kw.pop("budget", budget),
                           host_budget=None, **{"cache_experts": None, "per_layer": None,
                                                **kw}).pool_capacities  # type: ignore[arg-type]

    assert plan(cache_experts=3) == (3, 3, 3)
    assert plan(per_layer=False) == (3 * SPEC.num_layers + SPEC.num_layers - 1,)
    assert plan(budget=_budget(fp, SPEC.num_experts, SPEC.num_layers - 1)) == (8, 8, 8)


def test_slots_text_says_where_the_spare_slots_are(model_dir: Path) -> None:
    cfg, fp = Checkpoint.open(model_dir).config, _footprint(model_dir)
    texts = [slots_text(plan_memory(cfg, fp, CPU, device_budget=_budget(fp, 2, spare),
                                    host_budget=None, cache_experts=None, per_layer=None))
             for spare in range(3)]
    assert texts == ["6 expert slots, 2 per layer", "7 expert slots, 2 per layer (3 in layer 0)",
                     "8 expert slots, 2 per layer (3 in layers 0-1)"]


def test_the_cache_numbers_unequal_pools_one_after_another() -> None:
    cache = ExpertCache("device", 2, 3, LRUPolicy, extra_slots=2)
    assert [(p.capacity, p.first_slot) for p in cache.pools] == [(3, 0), (3, 3), (2, 6)]
    assert cache.num_slots == 8
    for layer, pool in enumerate(cache.pools):
        slots = []
        for e in range(pool.capacity + 2):
            slots.append(cache.reserve(ExpertKey(layer, e)))
            cache.commit(ExpertKey(layer, e))
        assert len(pool.slots) == pool.capacity  # full, then every further key evicted one
        assert set(slots) == set(range(pool.first_slot, pool.first_slot + pool.capacity))


def _load(model_dir: Path, budget: int, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(model_dir, dtype="float32", cpu_memory=budget, max_seq_len=MAX_SEQ,
                           prefill_chunk=CHUNK, **options)


def test_a_run_with_spare_slots_stays_within_its_plan(model_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fp = _footprint(model_dir)
    budget = _budget(fp, SPEC.top_k, SPEC.num_layers - 1)
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ,
                         prefill_chunk=CHUNK) as rt:
        want = rt.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).token_ids
    with caplog.at_level(logging.INFO, logger="offload_rt"), _load(model_dir, budget) as rt:
        assert rt.plan.footprint == fp
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        cache = experts.device.cache
        assert [p.capacity for p in cache.pools] == [3, 3, 2]
        assert [experts.max_group(layer) for layer in range(3)] == [3, 3, 2]
        assert len(experts.device.slots) == cache.num_slots == rt.plan.device_slots == 8
        assert planned_bytes(rt) <= budget
        assert rt.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).token_ids == want
        for pool in cache.pools:
            assert len(pool.slots) <= pool.capacity
            assert sorted([*pool.slots.values(), *pool.free]) == list(
                range(pool.first_slot, pool.first_slot + pool.capacity))
    assert "offloading: 8 expert slots, 2 per layer (3 in layers 0-1)" in caplog.text


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_trace_of_unequal_pools_replays_exactly(model_dir: Path, tmp_path: Path,
                                                  policy: str) -> None:
    """The header keeps each layer's pool size; the replay at those sizes (groups split at each
    layer's size) gives the runtime's hits and misses, per layer too."""
    budget = _budget(_footprint(model_dir), SPEC.top_k, 1)
    with _load(model_dir, budget, prefetch=0, policy=policy) as rt:
        record_trace(rt, tmp_path / "t.jsonl.gz", PROMPTS, 12, ignore_eos=True)
    trace = read_trace(tmp_path / "t.jsonl.gz")
    assert (trace.header.capacity, trace.header.pool_capacities) == (2, [3, 2, 2])
    check = live_check(trace)
    assert check is not None and check["exact"], check
    sim = simulate(trace.access_steps([3, 2, 2]), lambda: make_policy(policy), [3, 2, 2],
                   num_layers=SPEC.num_layers)
    measured = [seq["measured"] for seq in trace.header.sequences]
    assert sim.hits == sum(m["hits"] for m in measured)
    assert sim.capacities == (3, 2, 2) and sim.capacity == 2
    # a list of the wrong length: a clear error with prefetch off too (before: IndexError)
    from cache_policies.replay import replay
    for prefetch in (False, True):
        with pytest.raises(ValueError, match="2 per-layer capacities for 3 layers"):
            replay(trace, lambda: make_policy(policy), [3, 2], prefetch=prefetch)


def test_per_layer_sizes_are_refused_where_they_cannot_apply() -> None:
    steps = [[ExpertKey(0, 0)], [ExpertKey(1, 0)]]
    with pytest.raises(ValueError, match="need per-layer pools"):
        simulate(steps, LRUPolicy, [2, 2], per_layer=False)
    with pytest.raises(ValueError, match="3 per-layer capacities for 2 layers"):
        simulate(steps, LRUPolicy, [2, 2, 2], num_layers=2)
    with pytest.raises(ValueError, match="outside num_layers=1"):
        simulate(steps, LRUPolicy, [2])


def test_prefill_prefetch_queues_no_more_than_each_target_layer_holds(model_dir: Path) -> None:
    """Prefill prefetch caps each predicted layer at that layer's pool, not at the pool of the
    layer that predicts (before: layer 0's c + 1, so layer 1's c-slot pool got one read too
    many, evicted before use)."""
    from offload_rt.engine.prefetch import NextLayerPredictor

    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k,
                         max_seq_len=64) as rt:
        predictor = NextLayerPredictor([b.ffn_norm for b in rt.model.layers],
                                       [b.router for b in rt.model.layers], SPEC.top_k)
        hidden = torch.randn(32, SPEC.hidden_size, generator=torch.Generator().manual_seed(3))
        sizes = {1: 3, 2: 2}
        keys = predictor.predict_prefill(0, hidden, 2, sizes.__getitem__)
    per_layer = {j: [k.expert for k in keys if k.layer == j] for j in sizes}
    assert {j: len(e) for j, e in per_layer.items()} == sizes  # 32 tokens use more than 3
    assert all(e == sorted(e) for e in per_layer.values())
