"""Working memory of fp8 experts (``quant.fp8``) besides their records, for the budget
(``engine.work_memory``).

Counted from the code: ``Fp8Format.ffn`` keeps one scratch matrix (a ``SlotPool`` of 2F x H
in the compute dtype) for the run's life and, while it dequantizes a block of ``DEQUANT_BLOCK``
weights, float32 temporaries (the weights, the scales repeated over them, their product; the
row indices) before the block is rounded into the scratch; its matrix products are the float
path's, counted as for float experts. ``Fp8Reader`` reads the fp8 matrices in their own dtype
(through ``direct_io``'s bounce buffer when a tensor's file phase is not the record's) and the
scales into float32. ``tests/test_quant_fp8.py`` measures a forward with torch's profiler and
checks measured <= estimate.
"""

from __future__ import annotations

import torch

from offload_rt.direct_io import ALIGN, BOUNCE
from offload_rt.engine.slots import slot_bytes
from offload_rt.quant.formats import ExpertFormat
from offload_rt.quant.fp8 import DEQUANT_BLOCK, Fp8Format

F32, I64 = 4, 8


def _dequant_block(rows: int, cols: int) -> int:
    """Peak bytes of one ``dequantize_into`` block of an [rows, cols] matrix: three float32
    [block, cols] tensors and the block's int64 row indices."""
    block = min(rows, max(1, DEQUANT_BLOCK // cols))
    return 3 * F32 * block * cols + I64 * block


def fixed_bytes(fmt: ExpertFormat | None, dtype: torch.dtype) -> int:
    """Bytes an fp8 ``ffn`` holds whatever the token count, on the device it computes on: the
    scratch matrix (with its alignment slack) and one block's dequantization temporaries; 0
    for other formats."""
    if not isinstance(fmt, Fp8Format):
        return 0
    h, f = fmt.hidden, fmt.inter
    item = torch.empty((), dtype=dtype).element_size()
    scratch = slot_bytes(2 * f * h, item) + ALIGN
    return scratch + max(_dequant_block(2 * f, h), _dequant_block(h, f))


def read_bytes(fmt: Fp8Format) -> int:
    """Bytes one ``Fp8Reader`` call allocates: the bounce buffer of its largest weight (its
    head and tail blocks too) and its largest scale tensor read (at most 4 bytes an element)
    and converted to float32."""
    largest = fmt.inter * fmt.hidden  # bytes of one fp8 matrix
    parts = fmt.layout.parts
    scales = max(_numel(parts["s13"].shape) // 2, _numel(parts["s2"].shape))
    return min(BOUNCE, largest) + 2 * ALIGN + scales * 2 * F32


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
