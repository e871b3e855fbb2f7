"""Working memory of quantized experts (``quant.formats``): what their computation and their
quantization at load allocate besides the records, for ``work_memory``.

Counted from the code of ``_QuantizedFormat.ffn``, ``Int8Format._mm`` and
``QuantizingReader.__call__`` with ``_QuantizedFormat.encode_into`` (tensor by tensor, at their
peak); ``tests/test_quant_budget.py``
measures real calls with torch's profiler and checks measured <= estimate <= 2 x measured +
slack, as ``tests/test_work_memory.py`` does for the float path.
"""

from __future__ import annotations

import torch

from offload_rt.direct_io import ALIGN
from offload_rt.engine.slots import slot_bytes
from offload_rt.quant import formats
from offload_rt.quant.formats import ExpertFormat

F32 = 4


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def quantized(fmt: ExpertFormat | None) -> bool:
    """Whether ``fmt`` computes from a record in its own scale dtype (int8, int4)."""
    return fmt is not None and fmt.scale_dtype is not None


def ffn_per_token(fmt: ExpertFormat, hidden: int, inter: int, dtype: torch.dtype) -> int:
    """Bytes per token of one ``fmt.ffn`` call on x in ``dtype``, at its widest: x's rows, their
    cast to the scale dtype (when it differs), [w1; w3] x (2F), then silu(gate) and its product
    with up (F each), or, during the down projection, that product, y (H) and y cast back."""
    assert fmt.scale_dtype is not None
    item, scale = _itemsize(dtype), _itemsize(fmt.scale_dtype)
    cast = int(fmt.scale_dtype != dtype)
    inputs = item * hidden + cast * scale * hidden
    return inputs + max(scale * 4 * inter, scale * (3 * inter + hidden) + cast * item * hidden)


def ffn_fixed(fmt: ExpertFormat, hidden: int, inter: int, device_type: str) -> int:
    """Bytes a quantized ``ffn`` holds whatever the token count: on a GPU, int8's dequantized
    [w1; w3] (torch has no CUDA int8 weight-only kernel): q as float32, q * scale (float32),
    then its cast to the scale dtype. CPU kernels read the record itself."""
    if device_type == "cpu" or fmt.name != "int8" or fmt.scale_dtype is None:
        return 0
    return 2 * inter * hidden * max(2 * F32, F32 + _itemsize(fmt.scale_dtype))


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
