"""Offloading never changes the answer: bit-identical float32 logits and identical tokens.

For three tiny random checkpoints, every built-in runtime policy, capacities from top_k per layer
up to all experts, prefetch depth 0/1/2 and both pool layouts, the offloaded run must give
exactly (``torch.equal``) the logits of the fully resident run for the same call sequence: a
16-token prefill, then 16 single-token decode steps fed with the resident run's greedy tokens.
``generate`` must give the same tokens too.

LRU gets the full cross product; the other policies a subset in which each still sees the
minimum capacity with prefetch on in both pool layouts. One resident reference is computed per
checkpoint and shared by every case. "opt" (Belady) needs the future and is simulator-only: the
runtime must refuse it up front.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from cache_policies import ExpertKey, LRUPolicy, make_policy, simulate
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.assemble import disk_reader
from offload_rt.engine.budget import footprint
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts, Tier
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.prefetch import NextLayerPredictor
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.transfer import HostToDevice
from offload_rt.errors import OptionError
from offload_rt.model import cpu_linear

PROMPT_LEN = 16
DECODE_STEPS = 16
NEW_TOKENS = 16
MAX_SEQ = 64
POOLS = ("layer", "global")
DEPTHS = (0, 1, 2)
OTHER_POLICIES = ("lfu", "lrfu", "router", "static")

SPECS = {
    "e4k2": TinySpec(num_experts=4, top_k=2, num_layers=2, seed=11),
    "e8k2l3": TinySpec(num_experts=8, top_k=2, num_layers=3, seed=12),
    # Odd sizes: one packed expert is 3*27*37*4 = 11988 bytes, so the experts' file offsets (and
    # with them their slots' phases) take every 4-byte alignment. The resident model must place
    # them alike: MKL's one-row float32 kernel rounds differently off 16-byte alignment on
    # AVX-512 EPYCs, where this checkpoint failed while resident experts were fresh tensors.
    "e4k1odd": TinySpec(num_experts=4, top_k=1, num_layers=2, hidden_size=27, head_dim=8,
                        intermediate_size=37, seed=13),
}


@dataclass(frozen=True)
class Reference:
    """What the fully resident runtime gives for the fixed call sequence."""

    model_dir: Path
    prompt: list[int]
    feed: list[int]  # the greedy tokens fed to the decode steps
    logits: list[torch.Tensor]  # [16, V] for the prefill, then [1, V] per decode step
    accesses: int  # (layer, expert) demand accesses over the call sequence
    generated: list[int]  # ``generate(prompt, max_new_tokens=NEW_TOKENS)``


def count_accesses(experts: object) -> list[int]:
    """Wrap ``experts.on_route`` to count demand accesses: the distinct experts each MoE call
    routes to (the MoE layer acquires each of them exactly once). Returns a 1-item counter."""
    counter = [0]
    original = experts.on_route  # type: ignore[attr-defined]

    def on_route(layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        counter[0] += torch.unique(ids).numel()
        original(layer, probs, ids)

    experts.on_route = on_route  # type: ignore[attr-defined]
    return counter


def run_sequence(rt: offload_rt.Runtime, prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
    """Prefill ``prompt``, then one decode step per token of ``feed``; all logits."""
    logits = [rt.model(torch.tensor(prompt), 0)]
    for i, tok in enumerate(feed):
        logits.append(rt.model(torch.tensor([tok]), len(prompt) + i))
    return logits


def _make_reference(model_dir: Path, spec: TinySpec) -> Reference:
    prompt = torch.randint(0, spec.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(spec.seed)).tolist()
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        assert not rt.offloaded
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
    """name -> its checkpoint's resident reference, built once per module."""
    cache: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in cache:
            spec = SPECS[name]
            cache[name] = _make_reference(
                make_hf_checkpoint(tmp_path_factory.mktemp(name), spec), spec)
        return cache[name]

    return get


def _cases() -> Iterator[object]:
    for name, spec in SPECS.items():
        k, n = spec.top_k, spec.num_experts
        for cap, depth, pool in itertools.product(range(k, n + 1), DEPTHS, POOLS):
            yield pytest.param(name, "lru", cap, depth, pool,
                               id=f"{name}-lru-c{cap}-p{depth}-{pool}")
        # Every other policy: minimum capacity with prefetch on in both layouts, and a middle
        # capacity without prefetch (where the policy alone decides every eviction).
        subset = [(k, 1, "layer"), (k, 2, "global"), ((k + n + 1) // 2, 0, "layer")]
        for policy in OTHER_POLICIES:
            for cap, depth, pool in subset:
                yield pytest.param(name, policy, cap, depth, pool,
                                   id=f"{name}-{policy}-c{cap}-p{depth}-{pool}")
        # Pools of unequal capacity (a budget's spare slots): top_k + 1 in every layer but the
        # last, every policy, prefetch 1 (and LRU at every depth)
        for policy, depth in [("lru", 0), ("lru", 2), *((p, 1) for p in ("lru", *OTHER_POLICIES))]:
            yield pytest.param(name, policy, UNEVEN, depth, "layer",
                               id=f"{name}-{policy}-uneven-p{depth}-layer")


UNEVEN = "uneven"  # a case's capacity: the budget of _uneven_budget


def _uneven_budget(ref: Reference, spec: TinySpec) -> int:
    """A budget of top_k slots per layer and layers - 1 more: pools of top_k + 1 but the last."""
    fp = footprint(Checkpoint.open(ref.model_dir).config, torch.float32, MAX_SEQ, 512)
    return fp.fixed + (spec.top_k * spec.num_layers + spec.num_layers - 1) * fp.slot


def _load(ref: Reference, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(ref.model_dir, dtype="float32", offload=True, max_seq_len=MAX_SEQ,
                           **options)


@pytest.mark.parametrize(("name", "policy", "cap", "depth", "pool"), list(_cases()))
def test_offloaded_matches_resident(reference: Callable[[str], Reference], name: str,
                                    policy: str, cap: int | str, depth: int, pool: str) -> None:
    ref, spec = reference(name), SPECS[name]
    size = {"cpu_memory": _uneven_budget(ref, spec)} if cap == UNEVEN else {"cache_experts": cap}
    with _load(ref, policy=policy, prefetch=depth, pool=pool, **size) as rt:
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        pools = experts.device.cache.pools
        assert len(pools) == (spec.num_layers if pool == "layer" else 1)
        if cap == UNEVEN:
            k, last = spec.top_k, spec.num_layers - 1
            assert [p.capacity for p in pools] == [k + 1] * last + [k]
        else:
            assert all(p.capacity == cap * (1 if pool == "layer" else spec.num_layers)
                       for p in pools)

        accesses = count_accesses(experts)
        experts.stats.reset()
        logits = run_sequence(rt, ref.prompt, ref.feed)
        for i, (got, want) in enumerate(zip(logits, ref.logits, strict=True)):
            assert got.dtype == torch.float32
            assert torch.equal(got, want), (
                f"call {i} (0 = prefill): max |diff| {(got - want).abs().max().item():.3g}")
        stats = experts.stats
        assert accesses[0] == ref.accesses  # same routing as the resident run
        assert stats.hits + stats.misses == ref.accesses
        assert stats.prefetch_useful + stats.prefetch_wasted <= stats.prefetch_issued
        if depth == 0:
            assert stats.prefetch_issued == 0

        accesses[0] = 0
        out = rt.generate(ref.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == ref.generated
        s = out.stats
        assert s["offloaded"] is True
        assert s["hits"] + s["misses"] == accesses[0]
        assert s["prefetch_useful"] + s["prefetch_wasted"] <= s["prefetch_issued"]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("name", ["e8k2l3", "e4k2"])
def test_prefetch_statistics_on_decode(reference: Callable[[str], Reference], name: str,
                                       depth: int, pool: str) -> None:
    """At minimum capacity a decode run predicts experts that are not resident: some prefetches
    are issued, and each one is counted at most once as useful or wasted."""
    ref, spec = reference(name), SPECS[name]
    with _load(ref, cache_experts=spec.top_k, prefetch=depth, pool=pool) as rt:
        out = rt.generate(ref.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert out.token_ids == ref.generated
        rt.experts.drain()
        s = rt.stats_dict()
    assert s["prefetch_issued"] > 0, s
    assert s["prefetch_useful"] + s["prefetch_wasted"] <= s["prefetch_issued"], s
    assert s["hits"] + s["misses"] > 0


def test_prefetch_counts_stay_in_the_generation_that_issued_them(
        reference: Callable[[str], Reference]) -> None:
    """``generate`` resets the statistics. A prefetch issued in one generation and used or
    evicted in the next must not be counted in the next (it broke useful + wasted <= issued),
    in a full generation or a prefill-only one (whose prefill prefetches too)."""
    ref, spec = reference("e8k2l3"), SPECS["e8k2l3"]
    with _load(ref, cache_experts=spec.top_k + 1, prefetch=2, pool="global") as rt:
        for _ in range(3):
            s = rt.generate(ref.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).stats
            assert s["prefetch_useful"] + s["prefetch_wasted"] <= s["prefetch_issued"], s
            rt.experts.drain()  # no queued prediction may start during the next prefill
            s = rt.generate(ref.prompt, max_new_tokens=1, ignore_eos=True).stats
            assert s["prefetch_useful"] + s["prefetch_wasted"] <= s["prefetch_issued"], s


@pytest.mark.parametrize("pool", POOLS)
def test_prefill_prefetches_the_next_layers_in_demand_order(
        reference: Callable[[str], Reference], pool: str) -> None:
    """A prefill chunk queues the next layer's experts (the union of its tokens' top-k) while
    the current layer computes, in ascending id (the order MoELayer takes them) and no more
    than the layer's cache holds; the logits stay the resident model's."""
    ref, spec = reference("e8k2l3"), SPECS["e8k2l3"]
    with _load(ref, cache_experts=spec.top_k + 1, prefetch=1, pool=pool) as rt:
        submitted: list[list[ExpertKey]] = []
        worker = rt.experts._worker
        original = worker.submit
        worker.submit = lambda keys: (submitted.append(list(keys)),  # type: ignore
                                      original(keys))
        out = rt.generate(ref.prompt, max_new_tokens=1, ignore_eos=True)
        rt.experts.drain()
        s, capacity = out.stats, rt.experts.max_group(1)
    assert out.token_ids == ref.generated[:1]
    submitted = [keys for keys in submitted if keys]  # the last layer has none to predict
    assert len(submitted) == spec.num_layers - 1  # layers 0 .. L-2 predict their next layer
    for keys in submitted:
        assert len({k.layer for k in keys}) == 1
        ids = [k.expert for k in keys]
        assert ids == sorted(ids) and 0 < len(ids) <= capacity
    assert s["prefetch_issued"] > 0, s


def record_groups(experts: OffloadedExperts) -> list[list[ExpertKey]]:
    """Wrap ``experts.acquire`` to record every group of keys the MoE layers acquire."""
    groups: list[list[ExpertKey]] = []
    original = experts.acquire

    def acquire(layer: int, ids: Sequence[int]) -> AbstractContextManager[object]:
        groups.append([ExpertKey(layer, e) for e in ids])
        return original(layer, ids)

    experts.acquire = acquire  # type: ignore[method-assign]
    return groups


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("policy", ["lru", *OTHER_POLICIES])
@pytest.mark.parametrize("name", list(SPECS))
def test_counts_equal_the_simulator(reference: Callable[[str], Reference], name: str,
                                    policy: str, pool: str) -> None:
    """Without prefetch the cache's counts are a pure function of the access sequence: the
    trace simulator, replaying the groups the MoE layers acquired, must give the same hits and
    misses per layer (it pins a whole step, as the cache must protect a whole group)."""
    ref, spec = reference(name), SPECS[name]
    with _load(ref, cache_experts=spec.top_k, policy=policy, prefetch=0, pool=pool) as rt:
        groups = record_groups(rt.experts)
        rt.experts.stats.reset()
        run_sequence(rt, ref.prompt, ref.feed)
        stats = rt.experts.stats
        capacity = rt.experts.device.cache.pools[0].capacity
    sim = simulate(groups, lambda: make_policy(policy), capacity, per_layer=pool == "layer",
                   num_layers=spec.num_layers)
    assert (stats.hits, stats.misses) == (sim.hits, sim.misses)
    assert {i: stats.layer_hits[i] for i in sim.layer_hits} == sim.layer_hits
    assert sum(map(len, groups)) == ref.accesses


def test_opt_policy_is_refused_by_the_runtime(reference: Callable[[str], Reference]) -> None:
    """Belady ("opt") needs the whole future access sequence: it exists for the simulator and
    cannot run live, so loading with it must fail up front, before any generation. (Today the
    refusal is the policy constructor's TypeError about its missing ``future`` argument.)"""
    ref = reference("e4k2")
    with pytest.raises((OptionError, TypeError, ValueError), match="future"):
        _load(ref, cache_experts=2, policy="opt")


def test_unknown_policy_is_refused(reference: Callable[[str], Reference]) -> None:
    ref = reference("e4k2")
    with pytest.raises((OptionError, ValueError), match="no-such-policy"):
        _load(ref, cache_experts=2, policy="no-such-policy")


# ---- bfloat16: decode steps take torch.mv, prefill a blockwise fp32 GEMM (model/cpu_linear) -----

WIDE = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=512,
                vocab_size=1024, dtype=torch.bfloat16, seed=14)  # [w1; w3] and lm_head: 1024 rows
WIDE_PROMPT = 48  # a prefill whose experts get >= 16 tokens each: the fp32 GEMM path


@pytest.fixture(scope="module")
def wide_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor],
                                                                      list[int], list[int]]:
    model_dir = make_hf_checkpoint(tmp_path_factory.mktemp("wide"), WIDE)
    prompt = torch.randint(0, WIDE.vocab_size, (WIDE_PROMPT,),
                           generator=torch.Generator().manual_seed(WIDE.seed)).tolist()
    with offload_rt.load(model_dir, offload=False, max_seq_len=MAX_SEQ) as rt:
        assert rt.dtype == torch.bfloat16
        logits = [rt.model(torch.tensor(prompt), 0)]
        feed: list[int] = []
        for i in range(DECODE_STEPS):
            feed.append(int(logits[-1][-1].argmax()))
            logits.append(rt.model(torch.tensor([feed[-1]]), WIDE_PROMPT + i))
    assert len(set(feed)) > 3, f"degenerate reference (tokens {feed}): pick another seed"
    return model_dir, logits, prompt, feed


@pytest.mark.parametrize(("policy", "depth", "pool"),
                         [("lru", 1, "layer"), ("lru", 2, "global"), ("router", 0, "layer")])
def test_bf16_cpu_kernels_match_resident(wide_reference: tuple[Path, list[torch.Tensor],
                                                                 list[int], list[int]],
                                           monkeypatch: pytest.MonkeyPatch, policy: str,
                                           depth: int, pool: str) -> None:
    model_dir, want, prompt, feed = wide_reference
    real_mv, mv_calls = torch.mv, [0]
    real_blocks, fp32_weights = cpu_linear._fp32_blocks, []

    def counting_mv(*args: object, **kwargs: object) -> torch.Tensor:
        mv_calls[0] += 1
        return real_mv(*args, **kwargs)  # type: ignore[arg-type]

    def recording_blocks(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        fp32_weights.append(tuple(weight.shape))
        return real_blocks(x, weight)

    monkeypatch.setattr(torch, "mv", counting_mv)
    monkeypatch.setattr(cpu_linear, "_fp32_blocks", recording_blocks)
    with offload_rt.load(model_dir, offload=True, cache_experts=WIDE.top_k, policy=policy,
                         prefetch=depth, pool=pool, max_seq_len=MAX_SEQ) as rt:
        got = run_sequence(rt, prompt, feed)
        assert rt.experts.stats.misses > 0
    if not cpu_linear.native_bf16():  # else the rules step aside and F.linear runs throughout
        assert mv_calls[0] > DECODE_STEPS  # experts and the LM head took the mv kernel
        assert (2 * WIDE.intermediate_size, WIDE.hidden_size) in fp32_weights  # prefill experts
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"call {i}: max |diff| {(g - w).abs().max().item():.3g}"


# ---- the CUDA layout (disk -> host tier -> device tier), both tiers in CPU memory ---------------

def _two_tier(rt: offload_rt.Runtime, slots_per_pool: int, pools: int, host_slots: int,
              depth: int) -> OffloadedExperts:
    """What ``build_offloaded`` makes for a GPU, with the device tier in RAM: the host tier's
    O_DIRECT reads into phase-placed slots, host -> device copies of those views, the host
    tier's own policy and victims, prefetch through both tiers."""
    cfg = rt.config
    numel, item = cfg.expert_numel, 4
    cpu = torch.device("cpu")
    dev = ExpertCache("device", slots_per_pool, pools, LRUPolicy)
    host = ExpertCache("host", host_slots, 1, LRUPolicy)
    predictor = NextLayerPredictor([b.ffn_norm for b in rt.model.layers],
                                   [b.router for b in rt.model.layers], cfg.top_k)
    return OffloadedExperts(Tier(dev, SlotPool(dev.num_slots, numel, torch.float32, cpu)),
                            disk_reader(rt.checkpoint, drop_page_cache=True), numel * item,
                            placement=ExpertPlacement(rt.checkpoint, torch.float32, cpu),
                            host=Tier(host, SlotPool(host_slots, numel, torch.float32, cpu)),
                            h2d=HostToDevice(), predictor=predictor, prefetch_depth=depth,
                            per_layer=pools > 1)


@pytest.mark.parametrize(("host_extra", "depth", "pool"),
                         [(0, 0, "layer"), (0, 1, "global"), (2, 2, "layer"), (99, 1, "layer")])
def test_host_tier_path_matches_resident(reference: Callable[[str], Reference], host_extra: int,
                                         depth: int, pool: str) -> None:
    ref, spec = reference("e8k2l3"), SPECS["e8k2l3"]
    pools = spec.num_layers if pool == "layer" else 1
    per_pool = spec.top_k if pool == "layer" else spec.top_k * spec.num_layers
    host_slots = min(spec.top_k + host_extra, spec.num_layers * spec.num_experts)
    with _load(ref, cache_experts=spec.top_k) as rt:
        experts = _two_tier(rt, per_pool, pools, host_slots, depth)
        rt.experts.close()
        rt.experts = experts
        rt.model.attach(experts, MAX_SEQ)
        logits = run_sequence(rt, ref.prompt, ref.feed)
        experts.drain()
        s = experts.stats
    for i, (got, want) in enumerate(zip(logits, ref.logits, strict=True)):
        assert torch.equal(got, want), f"call {i}: max |diff| {(got - want).abs().max().item()}"
    assert s.host_misses > 0 and s.bytes_host_to_device > 0 and s.h2d_busy_s > 0
    if host_extra >= 99:  # the host tier holds every expert: none is read from disk twice
        assert s.host_misses <= spec.num_layers * spec.num_experts and s.host_hits > 0
