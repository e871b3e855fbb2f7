"""Memory of an int8 trunk (``trunk="int8"``, ``model.int8_linear``): its bytes, for
``budget.footprint``, and what its matrix products allocate, for ``work_memory``.

Counted from the code of ``Int8Linear.forward`` and ``quant.kernels.int8_mm``: x cast to the
scale dtype and the product cast back (when the compute dtype is float32); on the dequantize +
GEMM path (``INT8_DEQUANT_MIN_ROWS`` rows or more, or ``in_features`` not a multiple of 16),
one block of weights in the scale dtype at a time (``kernels.blocks``: at most
``DEQUANT_BLOCK_BYTES``), the block's product, its scaled copy and what ``cpu_linear.linear``
adds (row padding, or its float32 path). ``tests/test_trunk_int8.py`` measures real forwards
with torch's profiler and checks measured <= estimate <= 2 x measured + slack, as
``tests/test_work_memory.py`` does for the float trunk.
"""

from __future__ import annotations

import torch

from offload_rt.config import ModelConfig
from offload_rt.model import cpu_linear
from offload_rt.quant import kernels
from offload_rt.quant.formats import default_scale_dtype
from offload_rt.tensor_names import int8_trunk_shapes, trunk_numel

F32 = 4
INT8 = "int8"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def trunk_bytes(cfg: ModelConfig, dtype: torch.dtype, trunk: str = "float") -> int:
    """Bytes of the resident trunk: every tensor in ``dtype``, or with an int8 ``trunk`` its
    ``int8_trunk_shapes`` matrices as int8 [out, in] + one scale per row in
    ``default_scale_dtype(dtype)``."""
    item = _itemsize(dtype)
    if trunk != INT8:
        return item * trunk_numel(cfg)
    quantized = int8_trunk_shapes(cfg)
    scale = _itemsize(default_scale_dtype(dtype))
    return item * trunk_numel(cfg, quantized) + sum(out * (inp + scale)
                                                    for out, inp in quantized.values())


def int8_parts(cfg: ModelConfig, trunk: str) -> str | None:
    """Which trunk parts ``trunk`` holds in int8, in words; None for a float trunk."""
    if trunk != INT8:
        return None
    return "attention" if "lm_head" not in int8_trunk_shapes(cfg) else "attention and LM head"


def attention_matrices(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of wq, wk/wv and wo: the int8 matrices a forward multiplies with every token
    of its chunk (the LM head sees one row)."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [(q, h), (kv, h), (h, q)]


def dequantizes(rows: int, inp: int) -> bool:
    """Whether ``kernels.int8_mm`` takes the dequantize + GEMM path for ``rows`` rows of x of
    width ``inp`` on a CPU (``kernels.uses_int8_dequant``)."""
    return rows >= kernels.INT8_DEQUANT_MIN_ROWS or inp % kernels.INT8_KERNEL_K_MULTIPLE != 0


def _block_rows(out: int, inp: int, scale: int) -> int:
    return kernels.blocks(out, inp, scale)[0].stop


def _fp32_path(scale_dtype: torch.dtype, rows: int) -> bool:
    """Whether the dequantized blocks' GEMM runs ``cpu_linear``'s float32 path (bf16 x)."""
    return (scale_dtype == torch.bfloat16 and not cpu_linear.native_bf16()
            and rows >= cpu_linear.FP32_MIN_TOKENS)


def _fp32_rows(block: int, inp: int) -> int:
    return min(block, max(1, cpu_linear.FP32_BLOCK_BYTES // (F32 * inp)))


def _matrix_per_token(out: int, inp: int, dtype: torch.dtype, rows: int) -> int:
    """Per row of x, what one ``Int8Linear`` of [out, inp] holds besides its output in the
    compute dtype: x and the product in the scale dtype when it is not the compute dtype; on
    the dequantize path the block's product and its scaled copy, and ``cpu_linear.linear``'s
    own: x and one block's product in float32 (its float32 path) or x and the product padded
    to up to 4/3 of the rows (``row_bucket``)."""
    scale_dtype = default_scale_dtype(dtype)
    scale = _itemsize(scale_dtype)
    held = scale * (inp + out) if scale_dtype != dtype else 0
    if not dequantizes(rows, inp):
        return held
    block = _block_rows(out, inp, scale)
    if _fp32_path(scale_dtype, rows):
        gemm = F32 * (inp + _fp32_rows(block, inp)) + scale * block
    else:
        gemm = scale * 4 * (inp + block) // 3
    return held + scale * block + gemm


def _matrix_fixed(out: int, inp: int, dtype: torch.dtype, rows: int) -> int:
    """One dequantized block of an [out, inp] matrix in the scale dtype (and its float32 copy
    on ``cpu_linear``'s float32 path); 0 on the kernel path."""
    scale_dtype = default_scale_dtype(dtype)
    scale = _itemsize(scale_dtype)
    if not dequantizes(rows, inp):
        return 0
    block = _block_rows(out, inp, scale)
    fp32 = F32 * _fp32_rows(block, inp) * inp if _fp32_path(scale_dtype, rows) else 0
    return scale * block * inp + fp32


def per_token(cfg: ModelConfig, dtype: torch.dtype, trunk: str, tokens: int) -> int:
    """Bytes per token an int8 trunk's attention projections add to the attention phase of a
    ``tokens``-token forward (the widest of them); 0 for a float trunk."""
    if trunk != INT8:
        return 0
    return max(_matrix_per_token(out, inp, dtype, tokens)
               for out, inp in attention_matrices(cfg))


def fixed(cfg: ModelConfig, dtype: torch.dtype, trunk: str, tokens: int) -> int:
    """Bytes an int8 trunk's products hold whatever the token count: the largest dequantized
    weight block of the attention projections (``tokens`` rows) or of the LM head (one row,
    on the dequantize path only when its ``in_features`` is not a multiple of 16)."""
    if trunk != INT8:
        return 0
    blocks = [_matrix_fixed(out, inp, dtype, tokens) for out, inp in attention_matrices(cfg)]
    head = int8_trunk_shapes(cfg).get("lm_head")
    if head is not None:
        blocks.append(_matrix_fixed(*head, dtype, 1))
    return max(blocks)


def head_bytes(cfg: ModelConfig, dtype: torch.dtype, trunk: str) -> int:
    """What an int8 LM head adds to the logits of one row: its product in the scale dtype
    beside its cast to the compute dtype (float32), and the one row's share of its
    dequantize path when it takes it."""
    head = int8_trunk_shapes(cfg).get("lm_head") if trunk == INT8 else None
    if head is None:
        return 0
    return _matrix_per_token(*head, dtype, 1)


def dequant_blocks(cfg: ModelConfig, dtype: torch.dtype, trunk: str,
                   tokens: int) -> list[tuple[int, int]]:
    """(out, in) of the weight blocks the attention projections of an int8 trunk hand
    ``cpu_linear.linear`` (in the scale dtype) for ``tokens`` rows: what the GEMM libraries'
    terms count (MKL's float32 path, oneDNN's per-shape state)."""
    if trunk != INT8:
        return []
    scale = _itemsize(default_scale_dtype(dtype))
    shapes = set()
    for out, inp in attention_matrices(cfg):
        if dequantizes(tokens, inp):
            for rows in kernels.blocks(out, inp, scale):
                shapes.add((rows.stop - rows.start, inp))
    return sorted(shapes)


def dequant_min_rows(cfg: ModelConfig) -> int:
    """The row count from which an int8 trunk's attention projections dequantize."""
    if any(inp % kernels.INT8_KERNEL_K_MULTIPLE for _, inp in attention_matrices(cfg)):
        return 1
    return kernels.INT8_DEQUANT_MIN_ROWS
