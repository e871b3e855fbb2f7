"""``x @ W.T`` for quantized weights on a CPU: torch's weight-only kernel, or dequantize + GEMM.

torch's weight-only kernels (``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``)
read the weights once per few rows of x: for a decode row they move 2x (int8) or ~3.5x (int4)
fewer bytes than a bf16 GEMM and win, but their cost grows with the rows far faster than the
BLAS GEMM's. ``python benchmarks/linear_bench.py --sections quantized --threads 1 --quant-rows
1,2,4,8,12,16,20,24,32,48,64,72,80,88,96,128,192,256 --repeats 7``
(``benchmarks/results/linear_quant_small.json``: this project's 2-core AMD EPYC with AVX-512
and bf16 instructions, torch 2.13, bf16 x, int4 groups of 64, the ``small`` preset's expert
matrices; each figure the median of 7 interleaved batches), in microseconds:

| [w1; w3] 7168 x 1024, rows: | 1 | 16 | 24 | 96 | 256 |
| --- | --- | --- | --- | --- | --- |
| bf16 GEMM (float experts) | 1062 | 2128 | 2654 | 7667 | 18642 |
| int8 kernel | 428 | 3300 | 4905 | 19613 | 52124 |
| int8 dequantize + GEMM | 1715 | 2713 | 3312 | 9161 | 20962 |
| int4 kernel | 386 | 2754 | 4116 | 16396 | 44216 |
| int4 dequantize + GEMM | 8291 | 10248 | 9575 | 14911 | 26933 |

(w2, 1024 x 3584: 1 row bf16 323, int8 kernel 191, int4 kernel 196.) From
``INT8_DEQUANT_MIN_ROWS`` / ``INT4_DEQUANT_MIN_ROWS`` rows converting the weights to the
compute dtype block by block and running the GEMM was faster on both matrices, and stayed so,
in each of four such runs (int8: the paths are within 10% of each other at 16-20 rows, and the
runs' crossovers were 16 or 24; int4: 96 in all four, 88 rows a tie). On Mixtral 8x7B's
expert matrices (``--quant-mixtral``, 3 repeats: ``results/linear_quant_mixtral.json``) int8's
crossover is 24 too and int4's between 96 and 128 (w2 at 96 rows 6% slower). Measured on one
thread: on this shared 2-core machine two-thread timings were dominated by descheduled OpenMP
threads (multiples of 8 ms); both paths parallelize over the weight's rows, so the crossover is
taken to carry over. From about 8 rows the bf16 GEMM is faster than both int kernels: quantized
experts save memory and bytes moved, not prefill time.

The rule is static (row count, format and shape only; no calibration at run time), so the same
inputs always take the same kernel and give the same bits: the resident and offloaded paths,
which both call ``int8_mm`` / ``int4_mm`` with an expert's own tokens, stay bit-identical. The
dequantized blocks are scratch, made per call from the record (the record itself keeps only the
kernels' packed layout, made once when it was written) and bounded by ``DEQUANT_BLOCK_BYTES``;
``offload_rt/engine/quant_memory.py`` counts them. int4 records are unpacked by the scheme
their own layout fingerprint names (``int4_layout``), never by what this CPU would pack.
Dequantization gives other bits than the kernels (the weights are rounded to the compute dtype
before the GEMM), well inside the quantization error.

With ``--quant-kernel int8-dot`` the few-row kernels are offload_rt's (``quant.int_dot``: int8
activations, integer dot products), and the dequantize path starts where those meet it (same
benchmark machine, one thread, ``small``'s matrices, median of 5, microseconds; the
``int8_dot`` / ``int4_dot`` rows of ``linear_bench.py --sections quantized`` time the same).
int4:

| rows | 64 | 96 | 128 | 192 | 256 | 384 |
| --- | --- | --- | --- | --- | --- | --- |
| [w1; w3] dequantize + GEMM | 15882 | 17303 | 20240 | 22655 | 26634 | 37200 |
| [w1; w3] int8-dot | 5904 | 8727 | 11606 | 17126 | 22851 | 34370 |
| w2 dequantize + GEMM | 7038 | 7760 | 9130 | 13326 | 13234 | 19053 |
| w2 int8-dot | 3207 | 4651 | 6341 | 9304 | 12495 | 18685 |

(``INT4_DOT_DEQUANT_MIN_ROWS``). int8 (the int8 kernel reads one row of x at a time, so its
cost grows with every row):

| rows | 8 | 16 | 24 | 32 |
| --- | --- | --- | --- | --- |
| [w1; w3] dequantize + GEMM | 4060 | 5194 | 4722 | 3767 |
| [w1; w3] int8-dot | 3675 | 4034 | 6577 | 7203 |
| w2 dequantize + GEMM | 1062 | 1333 | 1600 | 1997 |
| w2 int8-dot | 866 | 1824 | 2763 | 3690 |
| LM head 32000 x 1024 dequantize + GEMM | 9173 | 11688 | 14683 | 16830 |
| LM head int8-dot | 8903 | 15604 | 24547 | 31929 |

(``INT8_DOT_DEQUANT_MIN_ROWS``: between 8 and 16).
"""

from __future__ import annotations

import torch

from offload_rt.model.cpu_linear import linear
from offload_rt.quant import int4_layout, int_dot
from offload_rt.quant.int4_layout import Scheme

# rows of x from which dequantize + GEMM beats the weight-only kernel (module docstring;
# benchmarks/results/linear_quant_small.json)
INT8_DEQUANT_MIN_ROWS = 24
INT4_DEQUANT_MIN_ROWS = 96
INT4_DOT_DEQUANT_MIN_ROWS = 384  # with --quant-kernel int8-dot (tables above)
INT8_DOT_DEQUANT_MIN_ROWS = 12
# torch 2.13's aten._weight_int8pack_mm on CPU reads past the end of rows whose K is not a
# multiple of 16: at K = 24 or 40 with 2-11 rows it crashed (SIGSEGV) or gave errors of ~500
# (tests/test_quant_kernels.py); those shapes always take the dequantize path
INT8_KERNEL_K_MULTIPLE = 16
DEQUANT_BLOCK_BYTES = 8 * 2**20  # dequantized weights made at a time (compute dtype)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def uses_int8_dequant(x: torch.Tensor, kernel: str = "torch") -> bool:
    """Whether ``int8_mm`` dequantizes: a CPU call with ``INT8_DEQUANT_MIN_ROWS`` rows or more,
    or whose ``in_features`` is not a multiple of ``INT8_KERNEL_K_MULTIPLE`` (torch's kernel);
    with the ``int8-dot`` kernel, ``INT8_DOT_DEQUANT_MIN_ROWS`` rows or more."""
    if x.device.type != "cpu":
        return False
    if kernel != "torch":
        return _rows(x) >= INT8_DOT_DEQUANT_MIN_ROWS
    return _rows(x) >= INT8_DEQUANT_MIN_ROWS or x.shape[-1] % INT8_KERNEL_K_MULTIPLE != 0


def uses_int4_dequant(x: torch.Tensor, out_features: int, scheme: Scheme | None,
                      kernel: str = "torch") -> bool:
    """Whether ``int4_mm`` dequantizes: ``INT4_DEQUANT_MIN_ROWS`` rows or more
    (``INT4_DOT_DEQUANT_MIN_ROWS`` with the ``int8-dot`` kernel), and the weight's packing
    ``scheme`` (``int4_layout.scheme_of_layout`` of its record) is known and holds
    ``out_features`` in whole blocks."""
    least = INT4_DEQUANT_MIN_ROWS if kernel == "torch" else INT4_DOT_DEQUANT_MIN_ROWS
    return (x.device.type == "cpu" and _rows(x) >= least
            and scheme is not None and out_features % scheme[0] == 0)


def blocks(out_features: int, in_features: int, itemsize: int, align: int = 1) -> list[slice]:
    """Row ranges of a weight dequantized at a time: as few as keep each within
    ``DEQUANT_BLOCK_BYTES`` of the compute dtype, of equal size (a multiple of ``align``: int4's
    packing block) but the last, so the GEMMs see one or two weight shapes per matrix."""
    count = -(-out_features * in_features * itemsize // DEQUANT_BLOCK_BYTES)
    rows = -(-out_features // max(1, count))
    rows = -(-rows // align) * align
    return [slice(start, min(out_features, start + rows)) for start in range(0, out_features, rows)]


def int8_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
            kernel: str = "torch") -> torch.Tensor:
    """x [T, K] (scale dtype, CPU), w int8 [N, K], s [N] -> x @ (w * s).T [T, N]. ``kernel``:
    "torch" (torch's weight-only kernel) or "int8-dot" (``quant.int_dot``) for few rows."""
    if uses_int8_dequant(x, kernel):
        return int8_dequant_mm(x, w, s)
    if kernel == int_dot.NAME:
        return int_dot.int8_dot_mm(x, w, s)
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w, s)


def int8_dequant_mm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``int8_mm`` by blocks of rows of w converted to x's dtype (|q| <= 127 is exact in every
    float dtype) and ``cpu_linear.linear``; the per-row scale multiplies the outputs."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)  # [T, N]
    for rows in blocks(w.shape[0], w.shape[1], x.element_size()):
        out[:, rows] = linear(x, w[rows].to(x.dtype)) * s[rows]
    return out


def int4_mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor,
            scheme: Scheme | None, kernel: str = "torch") -> torch.Tensor:
    """x [T, K] (scale dtype, CPU), w packed uint8 [N, K/2] in ``scheme`` (None: unknown),
    sz [K/G, N, 2] -> [T, N]. ``kernel``: "torch" (torch's weight-only kernel) or "int8-dot"
    (``quant.int_dot``; needs a known ``scheme``) below the dequantize path's rows."""
    if uses_int4_dequant(x, w.shape[0], scheme, kernel):
        assert scheme is not None
        return int4_dequant_mm(x, w, group, sz, scheme)
    if kernel == int_dot.NAME:
        assert scheme is not None
        return int_dot.int4_dot_mm(x, w, group, sz, scheme)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), w, group, sz)


def int4_dequant_mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor,
                    scheme: Scheme) -> torch.Tensor:
    """``int4_mm`` by blocks of rows of w dequantized (``dequantize_int4_t``) and
    ``cpu_linear.linear``. Needs whole packing blocks of ``scheme``."""
    n, k = w.shape[0], 2 * w.shape[1]
    out = torch.empty(x.shape[0], n, dtype=x.dtype)  # [T, N]
    for rows in blocks(n, k, x.element_size(), scheme[0]):
        wt = dequantize_int4_t(w[rows], sz[:, rows], group, scheme, x.dtype)  # [K, b]
        out[:, rows] = linear(x, wt.t())
    return out


def dequantize_int4_t(w: torch.Tensor, sz: torch.Tensor, group: int, scheme: Scheme,
                      dtype: torch.dtype) -> torch.Tensor:
    """Packed rows w uint8 [b, K/2] (whole packing blocks of ``scheme``), sz [K/G, b, 2] -> the
    weights transposed, [K, b] in ``dtype``: (q - 8) * scale + zero, in float32 per element and
    rounded once, as the kernels compute them. Transposed because the packing stores each
    block k-major: unpacking to [K, b] writes 64-byte runs instead of scattering nibbles."""
    b, k = w.shape[0], 2 * w.shape[1]
    q = int4_layout.unpack_t(w, scheme).view(torch.int8).sub_(8)  # [K, b] in -8..7
    scale, zero = sz[..., 0].contiguous(), sz[..., 1].contiguous()  # [K/G, b] each
    out = torch.empty(k, b, dtype=dtype)
    torch.addcmul(zero[:, None], q.view(k // group, group, b), scale[:, None],
                  out=out.view(k // group, group, b))
    return out
