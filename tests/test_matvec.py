"""``matvec.linear``: torch.mv for one bfloat16 row on the CPU against wide matrices, F.linear
otherwise; same values as F.linear (to bf16 rounding), shapes kept, the choice deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_rt.model.matvec import MV_MIN_ROWS, linear, uses_mv


def _w(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    return (torch.randn(rows, cols, generator=g) / cols**0.5).to(dtype)


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (96,)])
def test_one_bf16_row_takes_mv_and_keeps_its_shape(shape: tuple[int, ...]) -> None:
    w = _w(MV_MIN_ROWS, 96, torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    assert uses_mv(x, w)
    y = linear(x, w)
    assert y.shape == (*shape[:-1], MV_MIN_ROWS) and y.dtype == torch.bfloat16
    ref = F.linear(x.float(), w.float())
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(linear(x, w), y)  # deterministic


@pytest.mark.parametrize(("rows", "tokens", "dtype"), [
    (MV_MIN_ROWS - 1, 1, torch.bfloat16),  # narrow: GEMM is faster
    (MV_MIN_ROWS, 2, torch.bfloat16),  # a prefill chunk
    (MV_MIN_ROWS, 1, torch.float32),  # fp32/fp16 gain nothing from mv
    (MV_MIN_ROWS, 1, torch.float16),
])
def test_everything_else_is_f_linear(rows: int, tokens: int, dtype: torch.dtype) -> None:
    w = _w(rows, 64, dtype)
    x = torch.randn(tokens, 64).to(dtype)
    assert not uses_mv(x, w)
    assert torch.equal(linear(x, w), F.linear(x, w))
