"""Budgets are promises: the cache never outgrows its slots, start-up refuses what cannot run,
sizes parse strictly, RSS stays within the budget, and expert reads drop the page cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, hf_config, hf_state_dict, make_hf_checkpoint
from page_cache import cached_pages, evict
from safetensors.torch import save_file

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


# ---- RSS of a checkpoint several times larger than the budget ----------------------------------

BIG = TinySpec(num_layers=4, hidden_size=512, intermediate_size=1536, num_heads=4,
               num_kv_heads=1, head_dim=32, num_experts=8, top_k=2, seed=3)
BIG_CHUNK = 16
BIG_SLOTS = 3  # global pool: 3 experts of 9 MiB, against 32 in the checkpoint
RSS_MARGIN = 40 * 2**20
"""What the budget does not count: torch's CPU allocator and oneDNN/MKL GEMM scratch buffers,
the prefetch thread's stack and malloc arena, Python objects of the runtime (measured: ~12 MiB
beyond trunk + touched slots). The budget itself already over-counts by the 64 MiB work reserve,
which tiny activations never use."""

RSS_SCRIPT = '''
import json, sys, threading, time
import psutil, torch
import offload_rt

model_dir = sys.argv[1]
budget, chunk, new_tokens = (int(a) for a in sys.argv[2:5])
torch.set_num_threads(1)
# build_trunk makes its modules on the meta device; the first meta-device init kernel lazily
# imports ~800 Python modules (sympy, torch._refs, ...), ~75 MiB whatever the model. That is
# import cost, not model memory: pay it before the baseline, and report it.
proc = psutil.Process()
before_meta = proc.memory_info().rss
with torch.device("meta"):
    torch.nn.Embedding(2, 2)


def vm_hwm():
    """The kernel's peak RSS of this process (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so under pytest it reports pytest's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


try:  # '5' resets VmHWM to the current RSS (Linux >= 4.0), so it is the peak from here on
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm_reset = True
except OSError:
    hwm_reset = False
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()


def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)


sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
rt = offload_rt.load(model_dir, cpu_memory=budget, pool="global", prefill_chunk=chunk,
                     max_seq_len=64)
out = rt.generate(list(range(1, 17)), max_new_tokens=new_tokens, ignore_eos=True)
stop.set()
sampler.join()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps({
    "meta_import": base - before_meta, "base": base, "peak_sampled": peak[0],
    "vm_hwm": vm_hwm(), "hwm_reset": hwm_reset,
    "offloaded": rt.offloaded, "slot_bytes": rt.experts.device.slots.nbytes,
    "tokens": len(out.token_ids), "bytes_from_disk": out.stats["bytes_from_disk"],
}))
'''


def write_big_checkpoint(out_dir: Path, spec: TinySpec) -> Path:
    """The HF layout of ``spec`` without building the model in RAM: names and shapes come
    from a meta-device MixtralForCausalLM, values from a seeded generator at unit-ish scale
    (as checkpoint_factory draws them). Seconds instead of a full transformers init."""
    import transformers

    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(hf_config(spec))
    gen = torch.Generator().manual_seed(spec.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in hf_state_dict(model).items():
        t = torch.empty(meta.shape).normal_(generator=gen)
        if t.dim() == 1:
            t = 1.0 + 0.1 * t
        elif not name.endswith("embed_tokens.weight"):
            t /= math.sqrt(t.shape[-1])
        tensors[name] = t
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", {"format": "pt"})
    hf_config(spec).save_pretrained(out_dir)
    return out_dir


def test_rss_growth_stays_within_the_budget(tmp_path: Path) -> None:
    model_dir = write_big_checkpoint(tmp_path / "big", BIG)
    checkpoint_bytes = (model_dir / "model.safetensors").stat().st_size
    fp = footprint(Checkpoint.open(model_dir).config, torch.float32, MAX_SEQ, BIG_CHUNK)
    budget = fp.fixed + BIG_SLOTS * fp.slot
    assert checkpoint_bytes >= 3 * budget  # the whole model cannot be what we measure
    script = tmp_path / "rss_probe.py"
    script.write_text(textwrap.dedent(RSS_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(budget),
                           str(BIG_CHUNK), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # VmHWM is exact when it could be reset at the baseline, else it includes start-up peaks
    # (conservative); the 2 ms sampler backs it up where /proc is not there.
    growth = max(r["peak_sampled"], r["vm_hwm"]) - r["base"]
    mib = 2**20
    report = (f"checkpoint {checkpoint_bytes / mib:.0f} MiB, budget {budget / mib:.1f} MiB "
              f"(fixed {fp.fixed / mib:.1f}, slots {r['slot_bytes'] / mib:.1f}), peak RSS growth "
              f"{growth / mib:.1f} MiB (+{r['meta_import'] / mib:.1f} MiB of lazy imports "
              f"before the baseline; VmHWM reset: {r['hwm_reset']}), "
              f"read {r['bytes_from_disk'] / mib:.0f} MiB from disk")
    print(report)
    assert r["offloaded"] and r["tokens"] == NEW_TOKENS
    assert r["slot_bytes"] == BIG_SLOTS * fp.slot + ALIGN
    assert r["bytes_from_disk"] > checkpoint_bytes  # experts really were streamed, repeatedly
    assert growth <= budget + RSS_MARGIN, report
