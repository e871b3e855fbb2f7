"""Encoding by blocks of rows, in place, gives the bytes whole matrices give.

``_QuantizedFormat.encode_into`` quantizes ``ENCODE_BLOCK`` weights at a time straight into the
record's parts (bounded temporaries); the reference here is the whole-matrix algorithm
(``quantize_int8`` / ``quantize_int4`` + ``pack_for_cpu`` on [w1; w3] and w2, then
``RecordLayout.pack``). Blocks are forced small, so they split w1, w3 and w2 many times; int4
keeps blocks on the CPU packer's 64-row boundaries, and packs the whole matrix when a seam
would fall inside one.
"""

from __future__ import annotations

import pytest
import torch

from offload_rt.quant import formats
from offload_rt.quant.formats import Int4Format, Int8Format
from offload_rt.quant.int4 import pack_for_cpu, quantize_int4
from offload_rt.quant.int8 import quantize_int8


def reference(fmt: Int8Format | Int4Format, w1: torch.Tensor, w3: torch.Tensor,
              w2: torch.Tensor) -> torch.Tensor:
    if isinstance(fmt, Int8Format):
        q13, s13 = quantize_int8(torch.cat([w1, w3]), fmt.scale_dtype)
        q2, s2 = quantize_int8(w2, fmt.scale_dtype)
        return fmt.layout.pack({"w13": q13, "s13": s13, "w2": q2, "s2": s2})
    q13, s13 = quantize_int4(torch.cat([w1, w3]), fmt.group, fmt.scale_dtype)
    q2, s2 = quantize_int4(w2, fmt.group, fmt.scale_dtype)
    return fmt.layout.pack({"w13": pack_for_cpu(q13), "s13": s13, "w2": pack_for_cpu(q2),
                            "s2": s2})


# (hidden, intermediate): 96 intermediate rows put the w1/w3 seam off a 64-row block; 96
# hidden rows end w2 inside one
SHAPES = [(128, 256), (256, 192), (64, 96), (96, 128)]


@pytest.mark.parametrize("block", [64 * 32, 2**20])
@pytest.mark.parametrize(("hidden", "inter"), SHAPES)
@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_give_the_whole_matrix_bytes(monkeypatch: pytest.MonkeyPatch, block: int,
                                            hidden: int, inter: int, name: str,
                                            dtype: torch.dtype) -> None:
    monkeypatch.setattr(formats, "ENCODE_BLOCK", block)
    gen = torch.Generator().manual_seed(hidden + inter)
    w1, w3 = (torch.randn(inter, hidden, generator=gen).to(dtype) for _ in range(2))
    w2 = torch.randn(hidden, inter, generator=gen).to(dtype)
    fmt = Int8Format(hidden, inter, torch.bfloat16) if name == "int8" else \
        Int4Format(hidden, inter, 32, torch.bfloat16)
    want = reference(fmt, w1, w3, w2)
    assert torch.equal(fmt.encode(w1, w3, w2), want)
    stale = torch.full((fmt.nbytes,), 0xAB, dtype=torch.uint8)  # a reused slot
    fmt.encode_into(stale, w1, w3, w2)
    assert torch.equal(stale, want)
