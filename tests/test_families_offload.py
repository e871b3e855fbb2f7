"""Offloading never changes the answer for the other families, at 64-128 experts top-8 too.

Qwen3-MoE with 128 experts top-8, OLMoE with 64 experts top-8 (clip_qkv) and Qwen2-MoE with a
shared expert: at the minimum capacity (top_k slots per layer, or top_k x layers in one global
pool) a 16-token prefill needs far more experts than fit, so each layer's experts are acquired
in groups of top_k; every runtime policy, both pool layouts, with and without prefetch, must
give exactly (``torch.equal``) the resident run's logits and tokens. Belady ("opt") needs the
future: it runs from the recorded access sequence, through the runtime and the simulator,
with the same counts. Traces recorded at these widths replay to the runtime's counts; the
shared expert stays in the trunk (its bytes in ``Footprint.trunk``, never a slot).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoint_factory import FamilySpec, make_family_checkpoint
from test_engine_exactness import count_accesses, record_groups, run_sequence

import offload_rt
from cache_policies import BeladyPolicy, ExpertKey, flatten, make_policy, simulate
from cache_policies.replay import replay
from offload_rt.engine.assemble import build_offloaded
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.trace_recorder import record_trace

PROMPT_LEN = 16
DECODE_STEPS = 16
NEW_TOKENS = 16
MAX_SEQ = 64
RUNTIME_POLICIES = ("lru", "lfu", "lrfu", "router", "static")

SPECS = {
    "qwen3_moe-e128k8": FamilySpec("qwen3_moe", num_experts=128, top_k=8, head_dim=16,
                                   norm_topk_prob=True, seed=31),
    "olmoe-e64k8": FamilySpec("olmoe", num_experts=64, top_k=8, clip_qkv=0.5,
                              rms_norm_eps=1e-5, seed=32),
    "qwen2_moe-e16k4": FamilySpec("qwen2_moe", num_experts=16, top_k=4, num_layers=3, seed=33),
}


@dataclass(frozen=True)
class Reference:
    model_dir: Path
    prompt: list[int]
    feed: list[int]
    logits: list[torch.Tensor]
    accesses: int
    generated: list[int]


def _make_reference(model_dir: Path, spec: FamilySpec) -> Reference:
    prompt = torch.randint(0, spec.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(spec.seed)).tolist()
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        accesses = count_accesses(rt.experts)
        logits = [rt.model(torch.tensor(prompt), 0)]
        feed: list[int] = []
        for i in range(DECODE_STEPS):
            feed.append(int(logits[-1][-1].argmax()))
            logits.append(rt.model(torch.tensor([feed[-1]]), PROMPT_LEN + i))
        n_accesses = accesses[0]
        generated = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert len(set(feed)) > 3, f"degenerate reference (tokens {feed}): pick another seed"
    return Reference(model_dir, prompt, feed, logits, n_accesses, generated)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            spec = SPECS[name]
            model_dir = make_family_checkpoint(tmp_path_factory.mktemp(name), spec)
            cache[name] = _make_reference(model_dir, spec)
        return cache[name]

    return get


def _load(ref: Reference, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(ref.model_dir, dtype="float32", offload=True, max_seq_len=MAX_SEQ,
                           **options)


def _cases() -> list[object]:
    out = []
    for name, policy in itertools.product(SPECS, RUNTIME_POLICIES):
        for depth, pool in ((1, "layer"), (2, "global")):
            out.append(pytest.param(name, policy, depth, pool, id=f"{name}-{policy}-p{depth}-{pool}"))
    out += [pytest.param(name, "lru", 0, "layer", id=f"{name}-lru-p0-layer") for name in SPECS]
    return out


@pytest.mark.parametrize(("name", "policy", "depth", "pool"), _cases())
def test_minimum_capacity_matches_resident(reference: Callable[[str], Reference], name: str,
                                           policy: str, depth: int, pool: str) -> None:
    ref, spec = reference(name), SPECS[name]
    with _load(ref, cache_experts=spec.top_k, policy=policy, prefetch=depth, pool=pool) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        per_pool = spec.top_k * (1 if pool == "layer" else spec.num_layers)
        assert [p.capacity for p in experts.device.cache.pools] == \
            [per_pool] * (spec.num_layers if pool == "layer" else 1)
        groups = record_groups(experts)
        experts.stats.reset()
        logits = run_sequence(rt, ref.prompt, ref.feed)
        for i, (got, want) in enumerate(zip(logits, ref.logits, strict=True)):
            assert torch.equal(got, want), (
                f"call {i} (0 = prefill): max |diff| {(got - want).abs().max().item():.3g}")
        assert sum(map(len, groups)) == ref.accesses
        assert max(map(len, groups)) <= per_pool
        if pool == "layer":  # the prefill needed more than a pool holds: it went in groups
            assert sum(1 for g in groups if g[0].layer == 0) > DECODE_STEPS + 1
        assert experts.stats.hits + experts.stats.misses == ref.accesses
        out = rt.generate(ref.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == ref.generated


@pytest.mark.parametrize("pool", ["layer", "global"])
@pytest.mark.parametrize("name", list(SPECS))
def test_opt_runs_from_the_recorded_sequence(reference: Callable[[str], Reference], name: str,
                                             pool: str) -> None:
    """Belady's MIN, given the access sequence a first run recorded, drives the runtime's cache
    on a second run of the same calls: same logits, and the simulator's counts."""
    ref, spec = reference(name), SPECS[name]
    with _load(ref, cache_experts=spec.top_k, prefetch=0, pool=pool) as rt:
        groups = record_groups(rt.experts)
        run_sequence(rt, ref.prompt, ref.feed)
        future = flatten(groups)
        # the cache's clock ticks before its first access (now = 1, 2, ...), the simulator's
        # starts at 0: one unused key in front lines the runtime up with the sequence
        ticked = [ExpertKey(-1, -1), *future]
        opt = build_offloaded(rt.checkpoint, rt.model, rt.plan, lambda: BeladyPolicy(ticked),
                              dtype=torch.float32, device=torch.device("cpu"), prefetch_depth=0,
                              drop_page_cache=True)
        rt.experts.close()
        rt.experts = opt
        rt.model.attach(opt, MAX_SEQ)
        logits = run_sequence(rt, ref.prompt, ref.feed)
        stats = opt.stats
        capacity = opt.device.cache.pools[0].capacity
    assert all(torch.equal(g, w) for g, w in zip(logits, ref.logits, strict=True))
    sim = simulate(groups, lambda: BeladyPolicy(future), capacity, per_layer=pool == "layer",
                   num_layers=spec.num_layers)
    assert (stats.hits, stats.misses) == (sim.hits, sim.misses)
    lru = simulate(groups, lambda: make_policy("lru"), capacity, per_layer=pool == "layer")
    assert sim.misses <= lru.misses


@pytest.mark.parametrize(("pool", "policy"),
                         list(itertools.product(("layer", "global"), RUNTIME_POLICIES)))
def test_traces_at_these_widths_replay_to_the_runtime_counts(
        reference: Callable[[str], Reference], pool: str, policy: str) -> None:
    """128 experts top-8: a traced run (two prompts, prefill in chunks of 4) replayed through
    the simulator at the runtime's pool size gives its hits and misses, in total and per
    layer, at the minimum capacity and at a middle one."""
    ref, spec = reference("qwen3_moe-e128k8"), SPECS["qwen3_moe-e128k8"]
    prompts = [ref.prompt[:10], ref.prompt[10:]]
    for capacity in (spec.top_k, 40):
        with _load(ref, cache_experts=capacity, policy=policy, pool=pool, prefetch=0,
                   prefill_chunk=4) as rt:
            trace = record_trace(rt, None, prompts, 8, ignore_eos=True, precision=None)
            slots = rt.experts.max_group(0)
        assert trace.header.num_experts == 128 and trace.header.top_k == 8
        hits = sum(s["measured"]["hits"] for s in trace.header.sequences)
        misses = sum(s["measured"]["misses"] for s in trace.header.sequences)
        sim = replay(trace, lambda: make_policy(policy), slots, per_layer=pool == "layer").sim
        assert (sim.hits, sim.misses) == (hits, misses), capacity
        per_layer = [sum(s["measured"]["layer_misses"].get(str(i), 0)
                         for s in trace.header.sequences) for i in range(spec.num_layers)]
        assert [sim.layer_misses.get(i, 0) for i in range(spec.num_layers)] == per_layer


def test_the_shared_expert_is_resident_and_in_the_trunk(
        reference: Callable[[str], Reference]) -> None:
    ref, spec = reference("qwen2_moe-e16k4"), SPECS["qwen2_moe-e16k4"]
    with _load(ref, cache_experts=spec.top_k) as rt:
        shared = sum(p.numel() * p.element_size()
                     for blk in rt.model.layers for p in blk.shared.parameters())
        trunk = sum(p.numel() * p.element_size() for p in rt.model.parameters())
        assert shared == 4 * spec.num_layers * (3 * spec.hidden_size * spec.shared_expert_size
                                                + spec.hidden_size)
        assert rt.plan.footprint.trunk == trunk
        assert rt.plan.footprint.expert == 4 * 3 * spec.hidden_size * spec.intermediate_size
