"""``cpu_linear.linear``: torch.mv for one bfloat16 row against wide matrices, a blockwise
float32 GEMM for many bfloat16 rows, F.linear otherwise; the values of F.linear (to bf16
rounding), shapes kept, the choice deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_rt.model import cpu_linear
from offload_rt.model.cpu_linear import FP32_MIN_TOKENS, MV_MIN_ROWS, linear, uses_fp32, uses_mv


@pytest.fixture(autouse=True)
def without_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules as on a CPU without bf16 instructions, whatever this one has (the last test
    switches them on)."""
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: False)


def _w(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    return (torch.randn(rows, cols, generator=g) / cols**0.5).to(dtype)


def _close_to_fp32(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = F.linear(x.float(), w.float())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (96,)])
def test_one_bf16_row_takes_mv_and_keeps_its_shape(shape: tuple[int, ...]) -> None:
    w = _w(MV_MIN_ROWS, 96, torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    assert uses_mv(x, w) and not uses_fp32(x, w)
    y = linear(x, w)
    assert y.shape == (*shape[:-1], MV_MIN_ROWS)
    _close_to_fp32(y, x, w)
    assert torch.equal(linear(x, w), y)  # deterministic


@pytest.mark.parametrize("shape", [(FP32_MIN_TOKENS, 96), (2, FP32_MIN_TOKENS * 2, 96)])
def test_many_bf16_rows_take_blockwise_fp32(shape: tuple[int, ...],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    w = _w(300, 96, torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    assert uses_fp32(x, w) and not uses_mv(x, w)
    whole = F.linear(x.float(), w.float()).to(torch.bfloat16)
    assert torch.equal(linear(x, w), whole)  # one block: the weight fits FP32_BLOCK_BYTES
    monkeypatch.setattr(cpu_linear, "FP32_BLOCK_BYTES", 7 * 96 * 4)  # 7 rows: 43 blocks
    y = linear(x, w)
    assert y.shape == (*shape[:-1], 300)
    _close_to_fp32(y, x, w)
    # Blocks may change the bits: MKL picks other kernels for a 7-row block than for all 300
    # rows (seen on AVX-512 EPYCs, for some x). What exactness rests on is that the blocks are
    # a function of the weight's shape only: the same call, with the weight anywhere, gives
    # the same bits.
    moved = torch.empty(w.numel() + 64, dtype=w.dtype)[5:5 + w.numel()].view_as(w)
    moved.copy_(w)
    assert torch.equal(linear(x, w), y) and torch.equal(linear(x, moved), y)


@pytest.mark.parametrize(("rows", "tokens", "dtype"), [
    (MV_MIN_ROWS - 1, 1, torch.bfloat16),  # narrow: GEMM is faster for one row
    (MV_MIN_ROWS, FP32_MIN_TOKENS - 1, torch.bfloat16),  # a few rows: bf16 GEMM wins
    (MV_MIN_ROWS, 1, torch.float32),  # fp32/fp16 gain nothing from either
    (MV_MIN_ROWS, FP32_MIN_TOKENS, torch.float16),
])
def test_everything_else_is_f_linear(rows: int, tokens: int, dtype: torch.dtype) -> None:
    w = _w(rows, 64, dtype)
    x = torch.randn(tokens, 64).to(dtype)
    assert not uses_mv(x, w) and not uses_fp32(x, w)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_cpus_with_bf16_instructions_keep_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: True)
    w = _w(MV_MIN_ROWS, 64, torch.bfloat16)
    for tokens in (1, FP32_MIN_TOKENS * 2):
        x = torch.randn(tokens, 64).to(torch.bfloat16)
        assert not uses_mv(x, w) and not uses_fp32(x, w)
        assert torch.equal(linear(x, w), F.linear(x, w))


def test_row_buckets_are_few_and_at_most_a_third_padding() -> None:
    buckets = [cpu_linear.row_bucket(rows) for rows in range(1, 513)]
    assert all(b >= rows and 3 * (b - rows) <= b for rows, b in enumerate(buckets, start=1))
    assert buckets == sorted(buckets)  # monotone: a longer prompt never takes fewer rows
    assert len(set(buckets)) == 18  # 1, 2, 3, 4, 6, 8, ..., 384, 512


@pytest.mark.parametrize("rows", [5, 7, 9, 33, 100])
def test_bf16_rows_are_padded_to_a_bucket_on_cpus_with_bf16_instructions(
        monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    """oneDNN keeps memory per row count it has seen: on such CPUs the GEMM runs on rows padded
    to ``row_bucket``, and only the real rows come back."""
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: True)
    seen: list[int] = []
    real = F.linear

    def spy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return real(x, w)

    w = _w(256, 64, torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear.F, "linear", spy)
    for kernel in (linear, cpu_linear.padded_linear):
        y = kernel(x, w)
        assert seen[-1] == cpu_linear.row_bucket(rows) > rows
        assert y.shape == (rows, 256) and y.is_contiguous()
        _close_to_fp32(y, x, w)
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: False)
    assert not cpu_linear.uses_row_buckets(x, w)  # other CPUs: their own rules, unpadded
