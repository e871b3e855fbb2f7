"""Budgets with quantized experts: a slot holds a record, so the same budget holds about 2x
(int8) or 3.5x (int4) the experts of bfloat16; each miss moves one record's bytes (from disk
for a quantized folder; float bytes from disk, a record into the cache, when quantizing at
load); and the work term covers what quantized experts allocate (their kernels, the encoder of
``QuantizingReader``), measured with torch's profiler as ``tests/test_work_memory.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint, make_quantized_checkpoint
from test_work_memory import (
    _config,
    assert_estimate_bounds,
    assert_generation_within_work,
    peak_allocated,
)

import offload_rt
from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine import quant_memory, work_memory
from offload_rt.engine.budget import footprint
from offload_rt.model.experts import ResidentExperts
from offload_rt.model.transformer import Transformer
from offload_rt.quant import formats
from offload_rt.quant.formats import ExpertFormat, Int4Format, Int8Format
from offload_rt.quant.reader import QuantizingReader

MiB = 2**20
MAX_SEQ = 64
WIDE = TinySpec(num_experts=8, top_k=2, num_layers=4, hidden_size=256, intermediate_size=512,
                num_heads=4, num_kv_heads=2, dtype=torch.bfloat16, seed=51)
PROMPT = list(range(3, 19))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            made[name] = (make_hf_checkpoint(out, WIDE) if name == "bfloat16"
                          else make_quantized_checkpoint(out, WIDE, name, 64))
        return made[name]

    return get


def test_the_same_budget_holds_2x_int8_and_3_5x_int4_slots(folders: Callable[[str], Path]
                                                           ) -> None:
    """bfloat16 experts of 3 x 256 x 512 x 2 bytes (768 KiB) against int8 records (388 KiB)
    and int4 records with groups of 64 (216 KiB); a slot is an expert + 4 KiB of slack."""
    def load(name: str, budget: int) -> offload_rt.Runtime:
        return offload_rt.load(folders(name), cpu_memory=budget, pool="global", prefetch=0,
                               max_seq_len=MAX_SEQ)

    def fixed(name: str) -> int:  # trunk, KV cache and work buffers (differ a little by format)
        with load(name, 2**40) as rt:  # only to read its footprint
            return rt.plan.footprint.fixed

    with load("bfloat16", 2**40) as rt:
        expert_budget = 8 * rt.plan.footprint.slot  # what 8 bfloat16 slots take
    slots = {}
    for name in ("bfloat16", "int8", "int4"):
        budget = fixed(name) + expert_budget
        with load(name, budget) as rt:
            plan = rt.plan
            assert rt.offloaded and plan.footprint.expert == rt.expert_format.nbytes
            assert plan.device_slots == (budget - plan.footprint.fixed) // plan.footprint.slot
            assert rt.experts.device.slots.nbytes - 4096 == plan.device_slots * \
                plan.footprint.slot
            slots[name] = plan.device_slots
    assert slots["bfloat16"] == 8
    assert 15 <= slots["int8"] <= 16, slots  # 1.97x
    assert 27 <= slots["int4"] <= 29, slots  # 3.5x


@pytest.mark.parametrize("source", ["int8", "int4", "int8 at load", "int4 at load"])
def test_each_miss_moves_one_record(folders: Callable[[str], Path], source: str) -> None:
    """A budget of top_k slots per layer, no prefetch: the cache holds records, and each miss
    reads the expert's bytes from its file: the record, or (quantized at load) its bfloat16
    matrices."""
    name = source.split()[0]
    at_load = source.endswith("at load")
    model_dir = folders("bfloat16" if at_load else name)
    options = {"experts": name, **({"group_size": 64} if name == "int4" else {})} \
        if at_load else {}
    with offload_rt.load(model_dir, cache_experts=WIDE.top_k, prefetch=0,
                         max_seq_len=MAX_SEQ, **options) as rt:
        fp = rt.plan.footprint
        with offload_rt.load(model_dir, cpu_memory=fp.fixed + WIDE.top_k * WIDE.num_layers *
                             fp.slot, pool="layer", prefetch=0, max_seq_len=MAX_SEQ,
                             **options) as budgeted:
            assert budgeted.plan.device_slots_per_pool == WIDE.top_k
            s = budgeted.generate(PROMPT, max_new_tokens=6, ignore_eos=True).stats
        record = rt.expert_format.nbytes
    float_bytes = 3 * WIDE.hidden_size * WIDE.intermediate_size * 2
    assert fp.expert == record < float_bytes / 1.9
    assert s["misses"] > 0 and s["bytes_host_to_device"] == 0  # the CPU's device tier is RAM
    assert s["bytes_from_disk"] == s["misses"] * (float_bytes if at_load else record)


# ---- the work term ------------------------------------------------------------------------------

def model_with_records(cfg_fields: dict[str, object], dtype: torch.dtype, fmt: ExpertFormat,
                       keys: int, record: Callable[[torch.Generator], torch.Tensor]
                       ) -> Transformer:
    """``test_work_memory``'s model (zero gates: every token to the same experts) with
    resident experts in ``fmt``, each ``record(gen)`` (drawn after the trunk, layer by layer)."""
    cfg = _config(**cfg_fields)
    model = Transformer(cfg, device="cpu")
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data = (0.05 * torch.randn(p.shape, generator=gen)).to(dtype)
    for block in model.layers:
        block.router.weight.data.zero_()
    records = {(layer, e): record(gen) for layer in range(cfg.num_layers)
               for e in range(cfg.num_experts)}
    model.attach(ResidentExperts(records, cfg.num_experts), keys, fmt.ffn)
    return model.eval()


def _quantized_model(cfg_fields: dict[str, object], dtype: torch.dtype, fmt_name: str,
                     keys: int) -> tuple[Transformer, ExpertFormat]:
    """``model_with_records`` with int8 or int4 records of random experts."""
    cfg = _config(**cfg_fields)
    h, f = cfg.hidden_size, cfg.intermediate_size
    scale = dtype if dtype != torch.float32 else torch.bfloat16
    fmt: ExpertFormat = Int8Format(h, f, scale) if fmt_name == "int8" else \
        Int4Format(h, f, 64, scale)

    def record(gen: torch.Generator) -> torch.Tensor:
        w = 0.05 * torch.randn(3 * f * h, generator=gen)
        return fmt.encode(w[:f * h].view(f, h), w[f * h:2 * f * h].view(f, h),
                          w[2 * f * h:].view(h, f))

    return model_with_records(cfg_fields, dtype, fmt, keys, record), fmt


CASES = {  # name: (config fields, dtype, format, tokens, positions attended)
    "int8-float32-prefill": ({}, torch.float32, "int8", 512, 512),
    "int8-bf16-prefill": ({}, torch.bfloat16, "int8", 512, 512),
    "int4-float32-prefill": ({}, torch.float32, "int4", 512, 512),
    "int4-bf16-decode": ({}, torch.bfloat16, "int4", 1, 512),
    "int8-wide-prefill": ({"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8,
                           "head_dim": 64}, torch.bfloat16, "int8", 256, 256),
    "int4-wide-float32": ({"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8,
                           "head_dim": 64}, torch.float32, "int4", 256, 256),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_peak_bounds_quantized_experts(name: str) -> None:
    fields, dtype, fmt_name, tokens, keys = CASES[name]
    model, fmt = _quantized_model(fields, dtype, fmt_name, keys)
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,),
                        generator=torch.Generator().manual_seed(1))
    measured = peak_allocated(lambda: model(ids, keys - tokens, last_only=True))
    estimate = work_memory.forward_peak(model.cfg, dtype, tokens, keys, fmt=fmt)
    assert_estimate_bounds(measured, estimate)


@pytest.mark.parametrize("block", [formats.ENCODE_BLOCK, 2**15])
@pytest.mark.parametrize("fmt_name", ["int8", "int4"])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_quantizing_reader_peak_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           fmt_name: str, file_dtype: torch.dtype,
                                           block: int) -> None:
    """One QuantizingReader call: the scratch slot, and encode's temporaries for one block of
    rows (a whole matrix here, or 128 rows of 256 at ``2**15``)."""
    monkeypatch.setattr(formats, "ENCODE_BLOCK", block)
    spec = TinySpec(num_experts=2, top_k=1, num_layers=1, hidden_size=256, intermediate_size=768,
                    num_heads=4, num_kv_heads=2, dtype=file_dtype, seed=52)
    ckpt = Checkpoint.open(make_hf_checkpoint(tmp_path, spec))
    h, f = spec.hidden_size, spec.intermediate_size
    fmt: ExpertFormat = Int8Format(h, f, torch.bfloat16) if fmt_name == "int8" else \
        Int4Format(h, f, 64, torch.bfloat16)
    reader = QuantizingReader(ckpt, fmt, direct=True)
    out = torch.empty(fmt.nbytes, dtype=torch.uint8)
    measured = peak_allocated(lambda: reader(ExpertKey(0, 1), out))
    estimate = quant_memory.encode_bytes(fmt, h, f, file_dtype)
    assert_estimate_bounds(measured, estimate)
    ckpt.close()


@pytest.mark.parametrize("experts", ["int8", "int4"])
def test_generation_quantizing_at_load_peaks_within_the_work_term(experts: str) -> None:
    """The demo model offloaded with its experts quantized as they are read (prefetch off: the
    profiler sees the calling thread only), chunked prefill, sampled tokens."""
    assert_generation_within_work(experts=experts, prefill_chunk=16, prefetch=0)


def test_footprint_counts_records() -> None:
    cfg = _config()
    fmt = Int8Format(cfg.hidden_size, cfg.intermediate_size, torch.bfloat16)
    quantized = footprint(cfg, torch.bfloat16, 512, 512, file_dtype=torch.uint8, fmt=fmt)
    plain = footprint(cfg, torch.bfloat16, 512, 512)
    assert quantized.expert == fmt.nbytes and plain.expert == 2 * cfg.expert_numel
    assert quantized.trunk == plain.trunk and quantized.kv_cache == plain.kv_cache


def test_a_trace_counts_records(folders: Callable[[str], Path]) -> None:
    """Traces size bytes per token by the slot's expert: the record."""
    from offload_rt.trace_recorder import runtime_header

    with offload_rt.load(folders("bfloat16"), experts="int8", cache_experts=2,
                         max_seq_len=MAX_SEQ) as rt:
        header = runtime_header(rt)
        assert header.expert_bytes == rt.expert_format.nbytes
        assert header.metadata["experts"] == {"format": "int8", "scale_dtype": "bfloat16"}
