"""fp8 experts: an fp8 checkpoint's experts kept in E4M3 in every tier, dequantized to compute.

Record (``Fp8Format``; each part on a 4 KiB boundary, ``quant.record``), with H = hidden size,
F = intermediate size and w13 = w1 stacked on w3 (one product gives gate and up):

    w13  float8_e4m3fn [2F, H]     s13  float32 [2F / r13, ceil(H / c13)]
    w2   float8_e4m3fn [H, F]      s2   float32 [ceil(H / r2), ceil(F / c2)]

Each scale multiplies a block of rows x columns of its matrix: the whole matrix (strategy
``tensor``: w1's and w3's scales stacked, so s13 is [2, 1]), one row (``channel``), or the
checkpoint's block (``block``, e.g. [128, 128]). Scales are kept in float32 whatever the file
stores (bfloat16, float16 and float32 convert exactly).

Computation (``ffn``): each matrix is dequantized into one scratch matrix in the compute dtype,

    w[n, k] = float32(q[n, k]) * s[n // r, k // c]   rounded once to the compute dtype

(compressed-tensors' ``_dequantize`` and transformers' ``Fp8Dequantize``; the product of an
E4M3 value and a 16-bit scale is exact in float32, so this equals their result in the scales'
dtype), then multiplied by ``model.cpu_linear.linear``, the float path's own kernel choice: the
same operations as the float checkpoint of the dequantized weights. The rule depends on shapes
and dtypes only, and the scratch buffer is one per format, so resident and offloaded runs are
bit-identical. Memory: the record (about one byte per weight) in every tier and on every link;
the scratch matrix, 2 x F x H in the compute dtype, and float32 temporaries of one block of
``DEQUANT_BLOCK`` weights (``quant.fp8_memory``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from offload_rt.direct_io import ALIGN
from offload_rt.engine.slots import SlotPool
from offload_rt.model.cpu_linear import linear
from offload_rt.quant.record import RecordLayout

FP8 = torch.float8_e4m3fn
DEQUANT_BLOCK = 2**20  # weights dequantized at a time: bounds the float32 temporaries
STRATEGIES = ("tensor", "channel", "block")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_block(strategy: str, block: tuple[int, int] | None, rows: int,
                cols: int) -> tuple[int, int]:
    """(rows, columns) of an [rows, cols] weight that one scale multiplies."""
    if strategy == "tensor":
        return rows, cols
    if strategy == "channel":
        return 1, cols
    if strategy == "block" and block is not None:
        return block
    raise ValueError(f"fp8 strategy {strategy!r} (block {block}) is not one of {STRATEGIES}")


def scale_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scales of an [rows, cols] weight with ``block``: [ceil(rows/r),
    ceil(cols/c)]."""
    return _cdiv(rows, block[0]), _cdiv(cols, block[1])


def scaled_float32(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float32(q) * s for E4M3 ``q`` [N, K] and float32 ``s`` broadcastable to it, bit for bit.

    On a CPU, torch converts E4M3 one element at a time (4.5 ns a weight here); this path is
    vectorized integer and float16 work, 3-4x faster (``benchmarks/fp8_bench.py``). E4M3's
    bits [s eeee mmm] (exponent bias 7) moved into float16's [s eeeee mmmmmmmmmm] (bias 15)
    read as 2^-8 times the E4M3 value, subnormals included; the one NaN code (eeee mmm all
    ones) gets float16's all-ones exponent, so it stays NaN. float16 -> float32 is exact, so is
    the product with 256 (the E4M3 value itself, a float32 normal), and the product with ``s``
    is then float32(q) * s. Off the CPU the conversion is native: the plain product.
    """
    if q.device.type != "cpu":
        return q.float() * s
    x = q.view(torch.uint8).to(torch.int16)
    em = x & 0x7F  # exponent and mantissa
    bits = (em + 1).bitwise_and_(0x80).add_(em).bitwise_left_shift_(7)  # 0x7F: 0xFF << 7
    del em
    bits.bitwise_or_(x.bitwise_left_shift_(8).bitwise_and_(-0x8000))  # the sign
    del x
    return bits.view(torch.float16).float().mul_(256.0).mul_(s)


def dequantize_into(out: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                    block: tuple[int, int]) -> None:
    """``out`` [N, K] (any float dtype) = float32(q) [N, K] * scales [ceil(N/r), ceil(K/c)]
    repeated over ``block`` (r, c), rounded once to ``out``'s dtype; ``DEQUANT_BLOCK``
    weights at a time (elementwise, so the blocks do not change a bit)."""
    n, k = q.shape
    rows = max(1, DEQUANT_BLOCK // k)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        index = torch.arange(start, stop, device=q.device) // block[0]
        s = scales[index].float()  # [rows, ceil(K/c)]
        if s.shape[1] > 1:
            s = s.repeat_interleave(block[1], dim=1)[:, :k]
        out[start:stop] = scaled_float32(q[start:stop], s)


def dequantize(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """A new [N, K] tensor in ``dtype``: ``dequantize_into`` (trunk weights, at load)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    dequantize_into(out, q, scales, block)
    return out


class Fp8Format:
    """The experts of an fp8 checkpoint (``quant.fp8_scheme.Fp8Scheme.spec()``): records
    filled from its tensors by ``quant.fp8_reader.Fp8Reader``, computed by dequantizing.
    ``ffn`` runs one call at a time (it reuses one scratch matrix per device and dtype), as
    the runtime does."""

    name = "fp8"
    storage_dtype = torch.uint8
    alignment = ALIGN  # a record's parts start on 4 KiB boundaries
    scale_dtype = None  # computes in the input's dtype, as the float format

    def __init__(self, hidden: int, inter: int, strategy: str,
                 block: tuple[int, int] | None = None) -> None:
        if strategy == "block" and block is not None and inter % block[0]:
            raise ValueError(f"fp8 blocks of {block[0]} rows do not divide intermediate_size "
                             f"{inter}, so w1's and w3's scales cannot be stacked")
        self.hidden, self.inter, self.strategy, self.block = hidden, inter, strategy, block
        self.block13 = scale_block(strategy, block, inter, hidden)  # w1's = w3's = w13's
        self.block2 = scale_block(strategy, block, hidden, inter)
        g1 = scale_grid(inter, hidden, self.block13)
        self.layout = RecordLayout([("w13", FP8, (2 * inter, hidden)),
                                    ("s13", torch.float32, (2 * g1[0], g1[1])),
                                    ("w2", FP8, (hidden, inter)),
                                    ("s2", torch.float32, scale_grid(hidden, inter, self.block2))],
                                   part_align=ALIGN)
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def numel(self) -> int:
        return self.layout.nbytes

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def encode(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("fp8 records are read from an fp8 checkpoint's tensors "
                                  "(quant.fp8_reader); float experts are not quantized to fp8")

    def encode_into(self, record: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> None:
        self.encode(w1, w3, w2)

    def scratch(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The [2F x H] matrix the weights are dequantized into, on a 4 KiB boundary."""
        key = (device, dtype)
        if key not in self._scratch:
            self._scratch[key] = SlotPool(1, 2 * self.inter * self.hidden, dtype,
                                          device).place(0, 0)
        return self._scratch[key]

    def ffn(self, x: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
        """SwiGLU expert: x [T, H] (compute dtype) -> [T, H], as ``expert_ffn`` computes it
        on the dequantized weights."""
        v = self.layout.views(record)
        h, f = self.hidden, self.inter
        scratch = self.scratch(x.device, x.dtype)
        gate_up = scratch.view(2 * f, h)  # [w1; w3]: [2F, H]
        dequantize_into(gate_up, v["w13"], v["s13"], self.block13)
        gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [T, F] each
        act = F.silu(gate) * up
        down = scratch[:h * f].view(h, f)  # w2: [H, F]
        dequantize_into(down, v["w2"], v["s2"], self.block2)
        return linear(act, down)

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"format": "fp8", "strategy": self.strategy}
        if self.block is not None:
            spec["block"] = list(self.block)
        return spec
