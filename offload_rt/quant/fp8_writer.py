"""fp8 experts written by ``offload-rt quantize --experts fp8``: a compressed-tensors checkpoint.

Each expert matrix w [N, K] is stored as llm-compressor's FP8 scheme with channel strategy
stores it (the layout ``quant.fp8_scheme`` reads, and vLLM serves):

    <prefix>.weight        F8_E4M3  [N, K]
    <prefix>.weight_scale  F32      [N, 1]

    scale[n] = max(max_k |w[n, k]| / 448, eps)         (448: float8_e4m3fn's largest value)
    q[n, k]  = float8_e4m3fn(clamp(w[n, k] / scale[n], -448, 448))    w ~ float32(q) * scale

symmetric, per output channel, computed in float32 from the weights as stored (eps: float32's,
so an all-zero row gets a tiny scale and zeros). Source: compressed-tensors'
``calculate_qparams`` (quantization/utils/helpers.py: ``max_val_pos / (bit_range / 2)`` with
bit_range = 448 - (-448), clamped to eps) and ``_quantize`` (lifecycle/forward.py: divide,
clamp to the type's range, cast). Attention, routers, embeddings, norms and the LM head stay
as stored; config.json's ``quantization_config`` is a compressed-tensors ``float-quantized``
one whose ``ignore`` names every other linear module, weights ``channel`` strategy, and
activations dynamic (nothing stored: the W8A16 computation here, W8A8 in vLLM).
"""

from __future__ import annotations

from typing import Any

import torch

from offload_rt.quant.fp8 import FP8

FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_SUFFIX = "weight_scale"


def quantize_fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (float8_e4m3fn [N, K], float32 scale [N, 1]) by the formula above."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True)  # [N, 1]
    scale = torch.clamp(amax / FP8_MAX, min=torch.finfo(torch.float32).eps)
    q = torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def compressed_tensors_config(ignore: list[str]) -> dict[str, Any]:
    """config.json's ``quantization_config``: fp8 weights per channel for the ``Linear``
    modules not in ``ignore`` (module names, without ``.weight``), as llm-compressor saves an
    ``FP8_DYNAMIC`` model (dynamic per-token activations: no stored activation scales)."""
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
               "dynamic": False, "group_size": None, "actorder": None,
               "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                   "dynamic": True, "group_size": None, "observer": None,
                   "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations,
                                          "output_activations": None,
                                          "format": "float-quantized"}}}
