"""``linear(x, weight)``: ``x @ weight.T`` with the kernel that is fastest for the shape on a CPU.

bfloat16 weights on a CPU without bf16 instructions (the common case) make torch's default GEMM
slow, and which kernel wins depends on how many rows ``x`` has (measured by
``benchmarks/linear_bench.py`` on this project's 2-core machine):

* one row (a decode step), matrix of >= 1024 rows: ``torch.mv`` is 1.2-1.6x faster
  (7168x1024: 664 -> 408 us; narrower matrices lose, 256x1024: 23 -> 34 us);
* >= 16 rows (prefill): float32 GEMM on the weight converted block by block is 0.9-1.2x as
  fast at 16 rows, 2.7-2.9x at 128 and 3.3-3.8x at 512 (7168x1024 at 512 rows: 133 -> 35 ms).
  The blocks bound the float32 copy to ``FP32_BLOCK_BYTES``; the result is rounded to
  bfloat16 as the GEMM's is;
* CPUs with bf16 instructions (AVX512-BF16, AMX; some of this project's machines): torch's
  oneDNN bf16 GEMM is the fast path (2.5-8x the float32 blocks there), but it keeps ~0.7 MiB
  per row count it has seen, so rows are padded to ``row_bucket`` sizes (18 up to 512);
* anything else, every other dtype or device: ``F.linear``.

The rule is static (shapes and dtype only, no per-run calibration), so the same inputs always
take the same kernel and give the same bits: the resident and offloaded paths, which both call
this, stay bit-identical. That matters: the float32 blocks' size changes the bits (MKL picks
other kernels for other output widths), and so does padding rows (``row_bucket``), so both
are functions of the shapes alone.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MV_MIN_ROWS = 1024  # weight rows from which torch.mv beats F.linear for one bf16 row
FP32_MIN_TOKENS = 16  # rows of x from which float32 GEMM beats bf16 GEMM
FP32_BLOCK_BYTES = 8 * 2**20  # float32 weight copy made at a time


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (torch's own probes; False if it lacks them)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _bf16_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and not native_bf16())


def uses_mv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _bf16_cpu(x, weight) and x.numel() == x.shape[-1] and weight.shape[0] >= MV_MIN_ROWS


def uses_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _bf16_cpu(x, weight) and x.numel() // x.shape[-1] >= FP32_MIN_TOKENS


def _fp32_blocks(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows_in = x.reshape(-1, x.shape[-1]).float()  # [N, in]
    out = torch.empty(rows_in.shape[0], weight.shape[0], dtype=x.dtype)  # [N, out]
    block = max(1, FP32_BLOCK_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], block):
        w = weight[start:start + block].float()  # [block, in]
        out[:, start:start + block] = F.linear(rows_in, w)  # rounded to bf16 on assignment
    return out.view(*x.shape[:-1], weight.shape[0])


def row_bucket(rows: int) -> int:
    """The row count a bf16 GEMM on a CPU with bf16 instructions is padded to: 1, 2, 3, 4, 6,
    8, 12, 16, 24, ... (powers of two and three quarters of them; at most a third wasted)."""
    if rows <= 2:
        return rows
    power = 1 << (rows - 1).bit_length()  # the smallest power of two >= rows
    return power * 3 // 4 if rows <= power * 3 // 4 else power


def uses_row_buckets(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's bf16 GEMM keeps memory per (weight shape, row count) it has run, for the
    process's life (``benchmarks/linear_bench.py``'s ``bf16_shapes``: 315 MiB over row counts
    2..128 x 4 weight shapes of the ``small`` preset, 26 MiB padded), so a prompt length or an
    expert's token count seen for the first time would grow a long session's memory past its
    budget; padded rows bound the row counts to ~2 log2(chunk)."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu" and native_bf16()
            and row_bucket(x.numel() // x.shape[-1]) != x.numel() // x.shape[-1])


def _bucketed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows_in = x.reshape(-1, x.shape[-1])  # [N, in]
    padded = rows_in.new_zeros(row_bucket(rows_in.shape[0]), rows_in.shape[1])  # [B, in]
    padded[:rows_in.shape[0]] = rows_in
    out = F.linear(padded, weight)[:rows_in.shape[0]]  # [N, out]
    return out.view(*x.shape[:-1], weight.shape[0])


def padded_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` with only the row-bucket rule (``uses_row_buckets``): for
    callers whose numbers must not change kernel otherwise (the router's logits)."""
    return _bucketed(x, weight) if uses_row_buckets(x, weight) else F.linear(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias, by the fastest kernel for the shape (see above)."""
    if uses_mv(x, weight):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    if uses_fp32(x, weight):
        return _fp32_blocks(x, weight)
    if uses_row_buckets(x, weight):
        return _bucketed(x, weight)
    return F.linear(x, weight)
