"""Budgets are promises: the cache never outgrows its slots, start-up refuses what cannot run
(naming the minimum and what to shrink), sizes parse strictly, and expert reads drop the page
cache. Peak RSS against the budget: tests/test_rss_budget.py; work buffers against measured
forwards: tests/test_work_memory.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint
from page_cache import cached_pages, evict

import offload_rt
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN, direct_supported
from offload_rt.engine.budget import Footprint, footprint
from offload_rt.engine.expert_cache import RESIDENT, ExpertCache
from offload_rt.engine.offloaded import OffloadedExperts
from offload_rt.engine.sizes import parse_size
from offload_rt.errors import BudgetError, OptionError

MAX_SEQ = 64
CHUNK = 512  # RuntimeOptions.prefill_chunk's default: the footprint depends on it
SPEC = TinySpec(num_experts=8, top_k=2, num_layers=3, seed=21)
PROMPT = torch.randint(0, SPEC.vocab_size, (16,),
                       generator=torch.Generator().manual_seed(5)).tolist()
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("budget"), SPEC)


@pytest.fixture(scope="module")
def resident_tokens(model_dir: Path) -> list[int]:
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=MAX_SEQ) as rt:
        return rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids


def _footprint(model_dir: Path) -> Footprint:
    cfg = Checkpoint.open(model_dir).config
    return footprint(cfg, torch.float32, MAX_SEQ, CHUNK)


def _minimum(fp: Footprint, pool: str) -> int:
    """What plan_memory documents as the least budget: fixed + top_k experts per pool."""
    pools = SPEC.num_layers if pool == "layer" else 1
    return fp.fixed + SPEC.top_k * pools * fp.slot


def _check_pools(cache: ExpertCache) -> None:
    """No pool holds more keys than its capacity, and each key sits in its own pool's slots."""
    for pool in cache.pools:
        resident = [k for k in pool.slots if cache.state[k] == RESIDENT]
        assert len(resident) <= len(pool.slots) <= pool.capacity
        slots = list(pool.slots.values()) + pool.free
        assert sorted(slots) == list(range(pool.first_slot, pool.first_slot + pool.capacity))
    assert len(cache.state) <= cache.num_slots


# ---- the expert pool at 25% of the experts' bytes -----------------------------------------------

@pytest.mark.parametrize("pool", ["layer", "global"])
def test_quarter_budget_is_never_exceeded(model_dir: Path, resident_tokens: list[int],
                                          pool: str) -> None:
    fp = _footprint(model_dir)
    all_experts = SPEC.num_layers * SPEC.num_experts * fp.expert
    expert_slots = all_experts // 4 // fp.expert  # 6 experts: 2 per layer, or 6 shared
    budget = fp.fixed + expert_slots * fp.slot  # a slot: an expert + its alignment slack
    with offload_rt.load(model_dir, dtype="float32", cpu_memory=budget, pool=pool,
                         prefetch=1, max_seq_len=MAX_SEQ) as rt:
        assert rt.plan.footprint == fp  # the test computes the same footprint as the runtime
        assert rt.offloaded  # chosen by the budget alone (offload=None)
        experts = rt.experts
        assert isinstance(experts, OffloadedExperts)
        cache, storage = experts.device.cache, experts.device.slots.storage
        assert cache.num_slots == rt.plan.device_slots == expert_slots
        assert len(experts.device.slots) == expert_slots
        # The storage's one ALIGN of start alignment is counted in fp.work (fixed).
        assert storage.numel() * storage.element_size() - ALIGN <= budget - fp.fixed

        checks = [0]
        reserve = cache.reserve

        def checked_reserve(*args: object, **kwargs: object) -> int | None:
            slot = reserve(*args, **kwargs)  # type: ignore[arg-type]
            _check_pools(cache)
            checks[0] += 1
            return slot

        forwards = [0]

        def after_forward(*_: object) -> None:
            forwards[0] += 1
            _check_pools(cache)
            assert storage.numel() * storage.element_size() - ALIGN <= budget - fp.fixed

        cache.reserve = checked_reserve  # type: ignore[method-assign]
        hook = rt.model.register_forward_hook(after_forward)
        try:
            out = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        finally:
            hook.remove()
        experts.drain()
        _check_pools(cache)
        assert forwards[0] == NEW_TOKENS  # the prefill, then a decode step per later token
        assert checks[0] > 0  # the cache really was under pressure
        assert out.stats["misses"] > 0
        assert out.token_ids == resident_tokens


# ---- start-up check ----------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["layer", "global"])
def test_budget_below_minimum_is_refused_with_the_minimum(model_dir: Path, pool: str) -> None:
    minimum = _minimum(_footprint(model_dir), pool)
    with pytest.raises(BudgetError, match=rf"\b{minimum} bytes\b") as info:
        offload_rt.load(model_dir, dtype="float32", cpu_memory=minimum - 1, pool=pool,
                        max_seq_len=MAX_SEQ)
    assert "--cpu-memory" in str(info.value)


HINT_CASES = {  # a model whose minimum is dominated by one part, and what the error advises
    "KV cache": (TinySpec(num_layers=8, hidden_size=64, num_heads=4, num_kv_heads=4,
                          max_position_embeddings=4096), 4096, 1, "global", "--max-seq-len"),
    "work buffers": (SPEC, 256, 512, "global", "lower prefill_chunk"),
    "expert slots": (TinySpec(num_layers=4, hidden_size=64, intermediate_size=1024,
                              num_heads=4, num_kv_heads=2), 64, 16, "layer", "--pool global"),
}


@pytest.mark.parametrize("part", list(HINT_CASES))
def test_refusal_names_the_largest_part_and_how_to_shrink_it(
        tmp_path: Path, part: str) -> None:
    spec, max_seq, chunk, pool, advice = HINT_CASES[part]
    model_dir = make_hf_checkpoint(tmp_path, spec)
    fp = footprint(Checkpoint.open(model_dir).config, torch.float32, max_seq, chunk)
    pools = spec.num_layers if pool == "layer" else 1
    slots = spec.top_k * pools * fp.slot
    parts = {"trunk": fp.trunk, "KV cache": fp.kv_cache, "work buffers": fp.work,
             "expert slots": slots}
    assert max(parts, key=lambda k: parts[k]) == part  # the case is what it claims
    minimum = fp.fixed + slots
    with pytest.raises(BudgetError, match=rf"\b{minimum} bytes\b") as info:
        offload_rt.load(model_dir, dtype="float32", cpu_memory=minimum - 1, pool=pool,
                        max_seq_len=max_seq, prefill_chunk=chunk)
    message = str(info.value)
    assert f"the {part} (" in message and advice in message
    if part == "expert slots":  # --max-seq-len was once advised whatever dominated
        assert "--max-seq-len" not in message


@pytest.mark.parametrize("pool", ["layer", "global"])
def test_budget_at_minimum_loads_and_runs(model_dir: Path, resident_tokens: list[int],
                                          pool: str) -> None:
    fp = _footprint(model_dir)
    with offload_rt.load(model_dir, dtype="float32", cpu_memory=_minimum(fp, pool), pool=pool,
                         max_seq_len=MAX_SEQ) as rt:
        assert rt.offloaded
        assert rt.plan.device_slots_per_pool == SPEC.top_k
        # The storage's one ALIGN of start alignment is counted in fp.work (fixed).
        assert rt.experts.device.slots.nbytes == _minimum(fp, pool) - fp.fixed + ALIGN
        out = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == resident_tokens


def test_cache_experts_beyond_the_budget_is_refused(model_dir: Path) -> None:
    fp = _footprint(model_dir)
    with pytest.raises(BudgetError, match="--cache-experts 3"):
        offload_rt.load(model_dir, dtype="float32", cpu_memory=_minimum(fp, "layer"),
                        cache_experts=3, max_seq_len=MAX_SEQ)


# ---- size parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29),
    (" 6GiB ", 6 * 2**30), ("4096", 4096), (4096, 4096), ("auto", None), ("AUTO", None),
    (None, None),
])
def test_sizes_parse(text: str | int | None, expected: int | None) -> None:
    assert parse_size(text, "--cpu-memory") == expected


@pytest.mark.parametrize("text", ["lots", "12XB", "", "GiB", "6 potatoes", "-5", "0", "-1GiB",
                                  "0MB", 0, -3])
@pytest.mark.parametrize("option", ["--cpu-memory", "--gpu-memory"])
def test_bad_sizes_name_the_option(text: str | int, option: str) -> None:
    with pytest.raises(OptionError, match=f"^{option}: "):
        parse_size(text, option)


def test_bad_budget_through_load_names_the_option(model_dir: Path) -> None:
    with pytest.raises(OptionError, match="--cpu-memory.*'plenty'"):
        offload_rt.load(model_dir, cpu_memory="plenty")


def test_auto_budget_loads(model_dir: Path) -> None:
    with offload_rt.load(model_dir, cpu_memory="auto", max_seq_len=MAX_SEQ) as rt:
        assert rt.plan.device_budget is not None and rt.plan.device_budget > 0


# ---- expert reads leave nothing in the page cache ------------------------------------------------

def _expert_ranges(model_dir: Path) -> list[tuple[Path, int, int]]:
    ckpt = Checkpoint.open(model_dir)
    return [(m.path, m.offset, m.nbytes) for layer in range(SPEC.num_layers)
            for e in range(SPEC.num_experts) for m in ckpt.expert(layer, e).matrices]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
@pytest.mark.parametrize("drop", [True, False])
def test_expert_reads_leave_nothing_in_the_page_cache(model_dir: Path, drop: bool) -> None:
    """With drop_page_cache (the default) experts come from the disk by O_DIRECT (or are
    dropped after a buffered read): not one page of an expert stays cached. Without it they
    do (the control, so the check can fail)."""
    files = sorted(model_dir.glob("*.safetensors"))
    ranges = _expert_ranges(model_dir)  # before evicting: reading headers caches pages
    with offload_rt.load(model_dir, dtype="float32", cache_experts=SPEC.top_k, prefetch=1,
                         drop_page_cache=drop, max_seq_len=MAX_SEQ) as rt:
        for f in files:  # loading read the trunk through the page cache: forget it
            evict(f)
        if sum(cached_pages(f) for f in files):
            pytest.skip("this file system keeps its pages (tmpfs?): nothing to measure")
        out = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        rt.experts.drain()
        cached = sum(cached_pages(path, off, n) for path, off, n in ranges)
        reader = rt.experts.reader
    assert out.stats["bytes_from_disk"] > 0
    if drop:
        assert cached == 0
        assert sum(cached_pages(f) for f in files) == 0
        if direct_supported(files[0]):
            assert reader.direct_matrices > 0
    else:
        assert cached > 0
        assert reader.direct_matrices == 0


def test_bytes_from_disk_counts_file_bytes(tmp_path: Path) -> None:
    """A bf16 checkpoint computed in float32: a read takes the expert's bf16 bytes from disk,
    half of what its float32 slot holds."""
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(num_experts=8, top_k=2, num_layers=2,
                                                      dtype=torch.bfloat16, seed=22))
    file_bytes = Checkpoint.open(model_dir).expert(0, 0).nbytes
    with offload_rt.load(model_dir, dtype="float32", cache_experts=2, prefetch=0,
                         max_seq_len=MAX_SEQ) as rt:
        assert rt.plan.footprint.expert == 2 * file_bytes
        s = rt.generate(PROMPT, max_new_tokens=4, ignore_eos=True).stats
    assert s["misses"] > 0
    assert s["bytes_from_disk"] == s["misses"] * file_bytes


def test_refusal_with_a_sliding_window_says_the_cache_stops_at_the_window(
        tmp_path: Path) -> None:
    """A rolling KV cache holds at most the window: lowering --max-seq-len only helps below it,
    and the advice says so (it used to say the cache grows with every position)."""
    spec = TinySpec(num_layers=8, hidden_size=64, num_heads=4, num_kv_heads=4,
                    max_position_embeddings=8192, sliding_window=2048)
    model_dir = make_hf_checkpoint(tmp_path, spec)
    fp = footprint(Checkpoint.open(model_dir).config, torch.float32, 8192, 1)
    assert fp.kv_window == 2048 and fp.kv_cache > fp.work + fp.trunk
    with pytest.raises(BudgetError) as info:
        offload_rt.load(model_dir, dtype="float32", cpu_memory=fp.fixed, pool="global",
                        max_seq_len=8192, prefill_chunk=1)
    assert "the KV cache (" in str(info.value)
    assert "below the model's sliding window of 2048" in str(info.value)
