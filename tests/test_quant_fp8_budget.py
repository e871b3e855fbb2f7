"""The work term covers what fp8 experts allocate (``quant.fp8_memory``): the dequantized scratch
matrix and one block's float32 temporaries on top of the float path's GEMMs, measured with
torch's profiler as ``tests/test_work_memory.py`` does (measured <= estimate <= 2 x measured +
1 MiB); and one ``Fp8Reader`` call's scale conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_quant_budget import model_with_records
from test_quant_fp8 import SPEC, VARIANTS, make_fp8_checkpoint
from test_work_memory import _config, assert_estimate_bounds, peak_allocated

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine import work_memory
from offload_rt.model.transformer import Transformer
from offload_rt.quant import fp8, fp8_memory
from offload_rt.quant.fp8 import FP8, Fp8Format
from offload_rt.quant.fp8_reader import Fp8Reader
from offload_rt.quant.select import select_format

MiB = 2**20


def _record(fmt: Fp8Format, gen: torch.Generator) -> torch.Tensor:
    parts = {p.name: p for p in fmt.layout.parts.values()}
    values = {}
    for name, part in parts.items():
        x = torch.rand(part.shape, generator=gen) if part.dtype == torch.float32 else \
            (4 * torch.randn(part.shape, generator=gen)).to(FP8)
        values[name] = x
    return fmt.layout.pack(values)


def _fp8_model(fields: dict[str, object], dtype: torch.dtype, strategy: str,
               keys: int) -> tuple[Transformer, Fp8Format]:
    """``test_quant_budget.model_with_records`` with random fp8 records."""
    cfg = _config(**fields)
    block = (64, 64) if strategy == "block" else None
    fmt = Fp8Format(cfg.hidden_size, cfg.intermediate_size, strategy, block)
    return model_with_records(fields, dtype, fmt, keys, lambda gen: _record(fmt, gen)), fmt


CASES = {  # name: (config fields, dtype, strategy, tokens, positions attended)
    "channel-float32-prefill": ({}, torch.float32, "channel", 512, 512),
    "channel-bf16-prefill": ({}, torch.bfloat16, "channel", 512, 512),
    "tensor-bf16-decode": ({}, torch.bfloat16, "tensor", 1, 512),
    "block-wide-float32": ({"hidden_size": 512, "intermediate_size": 1536, "num_heads": 8,
                            "head_dim": 64}, torch.float32, "block", 64, 64),
    "channel-wide-bf16-decode": ({"hidden_size": 512, "intermediate_size": 2048, "num_heads": 8,
                                  "head_dim": 64}, torch.bfloat16, "channel", 1, 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_peak_bounds_fp8_experts(name: str) -> None:
    fields, dtype, strategy, tokens, keys = CASES[name]
    model, fmt = _fp8_model(fields, dtype, strategy, keys)
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,),
                        generator=torch.Generator().manual_seed(1))
    measured = peak_allocated(lambda: model(ids, keys - tokens, last_only=True))
    estimate = work_memory.forward_peak(model.cfg, dtype, tokens, keys, fmt=fmt)
    assert_estimate_bounds(measured, estimate)
    assert fp8_memory.fixed_bytes(fmt, dtype) >= 2 * fmt.inter * fmt.hidden * dtype.itemsize


def test_dequantization_blocks_bound_the_temporaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A smaller block gives the same matrix (elementwise) and a smaller peak."""
    model, fmt = _fp8_model({}, torch.float32, "channel", 16)
    record = model._moe[0].experts._buffers[(0, 0)]  # type: ignore[attr-defined]
    v = fmt.layout.views(record)
    out = torch.empty(2 * fmt.inter, fmt.hidden)
    whole = peak_allocated(lambda: fp8.dequantize_into(out, v["w13"], v["s13"], fmt.block13))
    want = out.clone()
    monkeypatch.setattr(fp8, "DEQUANT_BLOCK", 2**12)
    small = peak_allocated(lambda: fp8.dequantize_into(out, v["w13"], v["s13"], fmt.block13))
    assert torch.equal(out, want) and small < whole / 4


def test_reader_allocates_what_read_bytes_counts(tmp_path: Path) -> None:
    """One read: the scales read and converted (the fp8 weights land in the record itself)."""
    ckpt = Checkpoint.open(make_fp8_checkpoint(tmp_path, SPEC, VARIANTS["ct-channel"]))
    fmt = select_format(ckpt, None, None, torch.float32, torch.device("cpu"))
    assert isinstance(fmt, Fp8Format)
    reader = Fp8Reader(ckpt, fmt, direct=True)
    out = torch.empty(fmt.nbytes, dtype=torch.uint8)
    measured = peak_allocated(lambda: reader(ExpertKey(1, 2), out))
    assert 0 < measured <= fp8_memory.read_bytes(fmt)
    ckpt.close()
