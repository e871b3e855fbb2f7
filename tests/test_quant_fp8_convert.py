"""The CPU's fast E4M3 -> float32 path (``quant.fp8.scaled_float32``) gives float32(q) * s bit
for bit: every E4M3 code (subnormals and the NaN code included) times scales from the smallest
subnormal to past the overflow guard, and ``dequantize_into`` for each scale strategy, rounded
into bfloat16 and float32, with flush-to-zero on and off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from offload_rt.quant.fp8 import FP8, dequantize_into, scaled_float32

CODES = torch.arange(256, dtype=torch.uint8).view(FP8)  # every E4M3 bit pattern
SCALES = [1.0, 0.00223, -3.5, 2.0**-149, 2.0**-126, 1e-30, 2.0**119, 2.0**120, 3e38,
          float("inf"), float("-inf"), float("nan"), 0.0, -0.0]


@pytest.fixture(params=[False, True], ids=["denormals", "flush_denormal"])
def flush(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.param and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.usefixtures("flush")
def test_every_code_times_every_scale_is_the_plain_product() -> None:
    # 1,000 copies: long enough for the vectorized loops, not only their scalar tails
    q = CODES.repeat(1000).view(1000, 256)
    for value in SCALES:
        s = torch.full((1000, 1), value)
        assert same_bits(scaled_float32(q, s), q.float() * s), value
    s = torch.tensor(SCALES).repeat_interleave(256 // 8 + 1)[:256].view(1, 256).expand(1000, 256)
    assert same_bits(scaled_float32(q, s), q.float() * s)  # a scale per column


@pytest.mark.usefixtures("flush")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [(1, 1000), (1, 1), (128, 128), (48, 40)],
                         ids=["tensor", "channel", "block128", "block48x40"])
def test_dequantize_into_matches_the_reference(dtype: torch.dtype,
                                               block: tuple[int, int]) -> None:
    n, k = 300, 520  # k not a multiple of the column blocks
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(FP8)
    q.view(torch.uint8)[0, :256] = torch.arange(256, dtype=torch.uint8)  # every code
    rows, cols = -(-n // block[0]), -(-k // min(block[1], k))
    scales = torch.rand(rows, cols, generator=g) * 1e-2
    full = scales.repeat_interleave(block[0], 0)[:n].repeat_interleave(min(block[1], k), 1)[:, :k]
    expected = (q.float() * full).to(dtype)
    out = torch.empty(n, k, dtype=dtype)
    dequantize_into(out, q, scales, (block[0], min(block[1], k)))
    assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
