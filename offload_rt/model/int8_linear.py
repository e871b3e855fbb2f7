"""An int8 trunk matrix (``trunk="int8"``): a ``Linear`` whose weight is int8 with one scale per
output channel, quantized at load (``quantize_rows``), multiplied by ``quant.kernels.int8_mm``.

The scheme is the int8 experts' (``quant.int8``: symmetric absmax per row, scales rounded to
their dtype first) and so is the computation (``quant.formats.Int8Format``): x is cast to the
scale dtype (the compute dtype when it is 16-bit, else bfloat16: ``default_scale_dtype``),
multiplied by torch's weight-only kernel for few rows or by dequantized blocks + GEMM for many
(a static rule by row count, so resident and offloaded runs stay bit-identical), and cast back;
a bias stays in the compute dtype and is added after. CPU only: torch has no CUDA kernel for
``aten._weight_int8pack_mm`` (``RuntimeOptions`` refuses ``--trunk int8 --device cuda``).
"""

from __future__ import annotations

import torch
from torch import nn

from offload_rt.model.params import empty_param
from offload_rt.quant.int8 import quantize_int8
from offload_rt.quant.kernels import int8_mm

QUANTIZE_BLOCK = 2**20  # weights quantized at a time: bounds the float32 temporaries


class Int8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T (+ bias), x [..., in] -> y [..., out] in x's dtype.

    ``weight``: int8 [out, in]; ``scale``: [out] in ``scale_dtype``; ``bias`` [out] (compute
    dtype) when ``bias``. Buffers start empty (on ``meta`` when the model is built) and are
    assigned from ``quantize_rows`` by ``load_state_dict(assign=True)``. ``kernel``: the
    few-row kernel of ``quant.kernels.int8_mm`` ("torch" or "int8-dot": ``use_kernel``).
    """

    kernel = "torch"

    def __init__(self, in_features: int, out_features: int, device: torch.device | str,
                 scale_dtype: torch.dtype, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8,
                                                   device=device))  # [out, in]
        self.register_buffer("scale", torch.empty(out_features, dtype=scale_dtype,
                                                  device=device))  # [out]
        self.bias = empty_param(out_features, device=device) if bias else None  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scale.dtype)  # [T, in]
        y = int8_mm(rows, self.weight, self.scale, self.kernel)  # [T, out] in the scale dtype
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype,
                  block: int = QUANTIZE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], scale [N] in ``scale_dtype``): ``quant.int8
    .quantize_int8`` a block of about ``block`` weights' rows at a time (rows are independent:
    the same bytes as the whole matrix at once), so its float32 temporaries stay ~13 bytes x
    ``block`` whatever the matrix (Mixtral 8x7B's LM head: 13 MiB instead of 1.6 GiB)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=scale_dtype)
    rows = max(1, block // k)
    for start in range(0, n, rows):
        q[start:start + rows], scale[start:start + rows] = quantize_int8(w[start:start + rows],
                                                                         scale_dtype)
    return q, scale


def use_int8_linears(model: nn.Module, modules: list[str], scale_dtype: torch.dtype) -> None:
    """Replace each ``Linear`` named in ``modules`` (``layers.3.attn.wq``, ``lm_head``) by an
    empty ``Int8Linear`` of its shape on its device, keeping its bias (``meta`` before the
    weights are assigned)."""
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        out_features, in_features = old.weight.shape
        setattr(parent, child, Int8Linear(in_features, out_features, old.weight.device,
                                          scale_dtype, bias=old.bias is not None))


def use_kernel(model: nn.Module, kernel: str) -> None:
    """Run every ``Int8Linear`` of ``model`` with ``kernel``."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.kernel = kernel
