"""``linear(x, weight)``: ``x @ weight.T``, with torch's matrix-vector kernel where it is faster.

A decode step multiplies one row by every weight matrix. On the CPU, for bfloat16, torch's
``mv`` kernel runs 1.3-1.6x faster than ``F.linear``'s GEMM path for matrices with 1024 or
more rows, and slower for narrow ones (measured by ``benchmarks/matvec_bench.py``: e.g.
7168x1024 588 -> 390 us, 32000x1024 3.48 -> 2.39 ms, 512x1024 51 -> 68 us). float16 and
float32 gain nothing. The rule is static, not calibrated per run, so the same inputs always
take the same kernel and give the same bits: the resident and offloaded paths (which both call
this) stay bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MV_MIN_ROWS = 1024


def uses_mv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]
            and weight.shape[0] >= MV_MIN_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias; ``torch.mv`` for one bfloat16 row on the CPU."""
    if uses_mv(x, weight):
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
