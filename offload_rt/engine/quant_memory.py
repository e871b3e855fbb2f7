"""Working memory of quantized experts (``quant.formats``): what their computation and their
quantization at load allocate besides the records, for ``work_memory``.

Counted from the code of ``_QuantizedFormat.ffn``, ``Int8Format._mm``, ``quant.kernels`` (the
dequantize + GEMM path: one block of weights in the compute dtype at a time, for calls of many
rows) and ``QuantizingReader.__call__`` with ``_QuantizedFormat.encode_into`` (tensor by tensor,
at their peak); ``tests/test_quant_budget.py``
measures real calls with torch's profiler and checks measured <= estimate <= 2 x measured +
slack, as ``tests/test_work_memory.py`` does for the float path.
"""

from __future__ import annotations

import torch

from offload_rt.direct_io import ALIGN
from offload_rt.engine.slots import slot_bytes
from offload_rt.quant import formats, kernels
from offload_rt.quant.formats import ExpertFormat

F32 = 4


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def quantized(fmt: ExpertFormat | None) -> bool:
    """Whether ``fmt`` computes from a record in its own scale dtype (int8, int4)."""
    return fmt is not None and fmt.scale_dtype is not None


def ffn_per_token(fmt: ExpertFormat, hidden: int, inter: int, dtype: torch.dtype, *,
                  device_type: str = "cpu", tokens: int = 1) -> int:
    """Bytes per token of one ``fmt.ffn`` call on x in ``dtype``, at its widest: x's rows, their
    cast to the scale dtype (when it differs), [w1; w3] x (2F), then silu(gate) and its product
    with up (F each), or, during the down projection, that product, y (H) and y cast back;
    for ``tokens`` rows on a CPU past the kernels' row threshold, each matrix product's
    dequantize + GEMM temporaries besides its output (``_dequant_per_token``)."""
    assert fmt.scale_dtype is not None
    item, scale = _itemsize(dtype), _itemsize(fmt.scale_dtype)
    cast = int(fmt.scale_dtype != dtype)
    inputs = item * hidden + cast * scale * hidden
    widest = max(scale * 4 * inter, scale * (3 * inter + hidden) + cast * item * hidden)
    held = {(2 * inter, hidden): scale * 2 * inter, (hidden, inter): scale * (3 * inter + hidden)}
    for out, inp in dequantized(fmt, hidden, inter, tokens, device_type):
        widest = max(widest, held[out, inp] + _dequant_per_token(fmt, out, inp))
    return inputs + widest


def ffn_fixed(fmt: ExpertFormat, hidden: int, inter: int, device_type: str,
              tokens: int = 1) -> int:
    """Bytes a quantized ``ffn`` holds whatever the token count: on a GPU, int8's dequantized
    [w1; w3] (torch has no CUDA int8 weight-only kernel): q as float32, q * scale (float32),
    then its cast to the scale dtype. On a CPU with ``tokens`` rows past the kernels' row
    threshold, one dequantized block (``_dequant_block``); the kernels read the record itself."""
    if fmt.scale_dtype is None:
        return 0
    if device_type == "cpu":
        return max([0] + [_dequant_block(fmt, out, inp) for out, inp in
                          dequantized(fmt, hidden, inter, tokens, device_type)])
    if fmt.name != "int8":
        return 0
    return 2 * inter * hidden * max(2 * F32, F32 + _itemsize(fmt.scale_dtype))


def dequantized(fmt: ExpertFormat | None, hidden: int, inter: int, tokens: int,
                device_type: str) -> list[tuple[int, int]]:
    """(out, in) of ``fmt``'s matrices ([w1; w3], w2) that ``quant.kernels`` dequantizes for a
    call of ``tokens`` rows (its row threshold; int4 also needs a packing it unpacks, in whole
    blocks); empty for float experts, GPUs and few rows."""
    if fmt is None or fmt.scale_dtype is None or device_type != "cpu":
        return []
    matrices = [(2 * inter, hidden), (hidden, inter)]
    if fmt.name == "int8":
        return matrices if tokens >= kernels.INT8_DEQUANT_MIN_ROWS else []
    scheme = getattr(fmt, "scheme", None)  # Int4Format: its records' packing
    if fmt.name != "int4" or scheme is None or tokens < kernels.INT4_DEQUANT_MIN_ROWS:
        return []
    return [(out, inp) for out, inp in matrices if out % scheme[0] == 0]


def dequant_matrices(fmt: ExpertFormat | None, hidden: int, inter: int, tokens: int,
                     device_type: str = "cpu") -> list[tuple[int, int]]:
    """(out, in) of the weight blocks (``kernels.blocks``) the dequantize + GEMM path hands
    ``cpu_linear.linear`` for ``tokens`` rows: what its own work terms (float32 path, oneDNN
    shapes) must count."""
    shapes = set()
    for out, inp in dequantized(fmt, hidden, inter, tokens, device_type):
        assert fmt is not None and fmt.scale_dtype is not None
        for rows in kernels.blocks(out, inp, _itemsize(fmt.scale_dtype), _align(fmt)):
            shapes.add((rows.stop - rows.start, inp))
    return sorted(shapes)


def dequant_min_rows(fmt: ExpertFormat) -> int:
    """The row count from which ``fmt`` dequantizes (``quant.kernels``)."""
    return kernels.INT8_DEQUANT_MIN_ROWS if fmt.name == "int8" else kernels.INT4_DEQUANT_MIN_ROWS


def _align(fmt: ExpertFormat) -> int:
    scheme = getattr(fmt, "scheme", None) if fmt.name == "int4" else None
    return scheme[0] if scheme is not None else 1


def _largest_block(fmt: ExpertFormat, out: int, inp: int) -> int:
    assert fmt.scale_dtype is not None
    return kernels.blocks(out, inp, _itemsize(fmt.scale_dtype), _align(fmt))[0].stop


def _dequant_per_token(fmt: ExpertFormat, out: int, inp: int) -> int:
    """Per row of x, what one dequantize + GEMM product of an [out, inp] matrix holds besides
    its [T, out] output: ``cpu_linear.linear``'s row padding (x and the product of up to 4/3 of
    the rows: ``row_bucket``) and int8's scaled copy of the block's product. The float32 path
    of ``cpu_linear`` is counted by ``work_memory`` from ``dequant_matrices``."""
    assert fmt.scale_dtype is not None
    scale, block = _itemsize(fmt.scale_dtype), _largest_block(fmt, out, inp)
    padded = scale * 4 * (inp + block) // 3
    return padded + scale * block * int(fmt.name == "int8")


def _dequant_block(fmt: ExpertFormat, out: int, inp: int) -> int:
    """One block of an [out, inp] matrix being dequantized: int8, its cast to the compute
    dtype; int4, the unpacked values (uint8), the block in the compute dtype, and its scales
    and zero points made contiguous ([inp / G, rows] each)."""
    assert fmt.scale_dtype is not None
    scale, rows = _itemsize(fmt.scale_dtype), _largest_block(fmt, out, inp)
    if fmt.name == "int8":
        return scale * rows * inp
    group = getattr(fmt, "group", inp)
    return (1 + scale) * rows * inp + 2 * scale * rows * (inp // group)


def _block_elements(fmt: ExpertFormat, rows: int, k: int) -> int:
    """Weights of the largest block ``encode_into`` quantizes at once from a [rows, k] matrix
    (``_QuantizedFormat._rows_into``)."""
    align = getattr(fmt, "row_align", 1)
    if rows % align:
        return rows * k
    return min(rows, max(1, formats.ENCODE_BLOCK // k // align) * align) * k


def encode_bytes(fmt: ExpertFormat, hidden: int, inter: int, file_dtype: torch.dtype) -> int:
    """Bytes one ``QuantizingReader`` call allocates: its scratch slot (one float expert in the
    file's dtype, with its alignment slack) and ``fmt.encode_into``'s peak on its largest
    block of rows: a float32 copy (unless the file is float32), two float32 temporaries of the
    rounding and the quantized values (``int8.py``, ``int4.py``); [w1; w3] concatenated first
    when int4's packing blocks straddle them."""
    item = _itemsize(file_dtype)
    scratch = slot_bytes(3 * hidden * inter, item) + ALIGN
    upcast = int(file_dtype != torch.float32)
    seam = inter % getattr(fmt, "row_align", 1) != 0
    block = max(_block_elements(fmt, 2 * inter if seam else inter, hidden),
                _block_elements(fmt, hidden, inter))
    concatenated = item * 2 * inter * hidden if seam else 0
    return scratch + concatenated + block * (F32 * upcast + 2 * F32 + 1)
