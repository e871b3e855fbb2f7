"""int8 weights: symmetric, one scale per output channel (row).

    scale[n] = max_k |w[n, k]| / 127   (rounded to the scale dtype first; an all-zero row: 1;
                                        a row holding NaN or infinity: that non-finite value,
                                        so the model computes NaN with it as the float one does
                                        and the non-finite logits check names it)
    q[n, k]  = clamp(round(w[n, k] / scale[n]), -127, 127)       w ~ q * scale

The scale is rounded to the dtype it is stored in *before* ``q`` is computed, so the stored
pair reconstructs ``w`` as well as it can (the usual "absmax" weight-only scheme, e.g.
LLM.int8's per-row weight quantization without outliers).
"""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale [N] in ``scale_dtype``)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q int8 [N, K], scale [N] -> w [N, K] in ``dtype`` (q * scale, computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)
