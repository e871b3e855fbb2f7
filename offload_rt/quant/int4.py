"""int4 weights: asymmetric, one scale and zero point per group of ``G`` input channels.

    per row n and group g (columns g*G .. g*G+G-1):
    scale = (max - min) / 15 (rounded to the scale dtype; a constant group: 1)
    zero  = min + 8 * scale (rounded to the scale dtype)
    q     = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)      w ~ (q - 8) * scale + zero

This is the convention of torch's weight-only int4 kernels ("tinygemm":
``aten._weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm``), whose ``qScaleAndZeros`` is
[K / G, N, 2] (scale, zero). Their packed weight layout is not portable: on CPUs it depends on
the instruction set torch dispatches to (AVX-512 packs 64-row blocks, AVX2 32-row blocks, the
scalar kernels pairs of rows; ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``), so a record is
packed by torch itself when it is written and carries the layout's fingerprint
(``cpu_layout``); a machine whose torch packs differently refuses it by name.
"""

from __future__ import annotations

import hashlib

import torch

INNER_K_TILES = 2  # torch's CPU packer ignores it; the CUDA packer needs 2, 4 or 8


def quantize_int4(w: torch.Tensor, group: int, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int32 [N, K] in 0..15, scale_and_zero [K / group, N, 2])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input channels are not a multiple of the group size {group}")
    wg = w.float().view(n, k // group, group)
    low, high = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, K/G]
    scale = torch.where(high > low, (high - low) / 15, torch.ones_like(low)).to(scale_dtype)
    zero = (low + 8 * scale.float()).to(scale_dtype)
    offset = zero.float() - 8 * scale.float()
    q = torch.round((wg - offset[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return q.to(torch.int32).view(n, k), sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """q int32 [N, K] in 0..15, scale_and_zero [K/G, N, 2] -> w [N, K] in ``dtype``."""
    n, k = q.shape
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # [N, K/G] each
    w = (q.float().view(n, k // group, group) - 8) * scale[..., None] + zero[..., None]
    return w.view(n, k).to(dtype)


def pack_for_cpu(q: torch.Tensor) -> torch.Tensor:
    """q int32 [N, K] in 0..15 -> uint8 [N, K / 2] in this torch's CPU kernel layout."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
    return packed.view(q.shape[0], q.shape[1] // 2)


def layout_probe() -> torch.Tensor:
    """The fixed matrix whose packing fingerprints a layout: int32 [128, 64] in 0..15."""
    rows = torch.arange(128, dtype=torch.int32)[:, None]
    cols = torch.arange(64, dtype=torch.int32)[None, :]
    return (rows * 7 + cols * 3 + rows * cols) % 16


def layout_fingerprint(packed_probe: torch.Tensor) -> str:
    """The fingerprint of a layout from its packing of ``layout_probe()`` (uint8 [128, 32])."""
    return hashlib.sha256(packed_probe.contiguous().numpy().tobytes()).hexdigest()[:16]


def cpu_layout() -> str:
    """This torch's CPU int4 packing, as '<capability>-<fingerprint>': the fingerprint hashes
    the packing of ``layout_probe()``, so two machines agree iff their layouts do."""
    digest = layout_fingerprint(pack_for_cpu(layout_probe()))
    return f"{torch.backends.cpu.get_cpu_capability().lower()}-{digest}"
