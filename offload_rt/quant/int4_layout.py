"""torch's CPU int4 packings, known by their fingerprint: which one a record holds, packing and
unpacking it without torch's packer.

``aten._convert_weight_to_int4pack_for_cpu`` packs [N, K] values 0..15 into [N, K / 2] bytes in
a layout that depends on the instruction set torch dispatches to
(``aten/src/ATen/native/cpu/int4mm_kernel.cpp``): the rows in blocks of R, each block stored
k-major as [K, R / 2] bytes, two rows per byte (low nibble, high nibble):

| scheme | R | byte j of a block's k-th row of bytes holds rows | torch's kernels |
| --- | --- | --- | --- |
| ``(64, "halves")`` | 64 | j, j + 32 | AVX-512 |
| ``(32, "halves")`` | 32 | j, j + 16 | AVX2 |
| ``(32, "pairs")`` | 32 | 2j, 2j + 1 | scalar (``default``) |

A record's layout is named by its ``cpu_layout`` fingerprint (``int4.cpu_layout``: the hash of
the packing of ``int4.layout_probe()``). ``scheme_of_layout`` finds the scheme whose packing of
the probe has that fingerprint, so code that reads a record's nibbles itself (``kernels``'
dequantize + GEMM) follows the record, never the CPU it runs on; a fingerprint none of the
schemes gives is ``None`` (such records run through torch's kernel only).
"""

from __future__ import annotations

import functools

import torch

from offload_rt.quant.int4 import layout_fingerprint, layout_probe

Scheme = tuple[int, str]  # (rows per block, "halves" | "pairs")
SCHEMES: tuple[Scheme, ...] = ((64, "halves"), (32, "halves"), (32, "pairs"))


def _nibbles(t: torch.Tensor, scheme: Scheme, blocks: int, k: int) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Views of ``t`` [K, blocks * R] (k-major rows) as the low and high nibbles' rows, each
    [blocks, K, R / 2] in the packing's byte order."""
    per, how = scheme
    if how == "halves":  # byte j: rows j and j + R/2 of its block
        parts = t.view(k, blocks, 2, per // 2)
        low, high = parts[:, :, 0, :], parts[:, :, 1, :]
    else:  # byte j: rows 2j and 2j + 1
        parts = t.view(k, blocks, per // 2, 2)
        low, high = parts[..., 0], parts[..., 1]
    return low.permute(1, 0, 2), high.permute(1, 0, 2)


def unpack_t(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Packed rows w uint8 [b, K / 2] (b a multiple of the scheme's R) -> q uint8 [K, b]
    (transposed: the packing stores each block k-major, so [K, b] is written in runs)."""
    b, k = w.shape[0], 2 * w.shape[1]
    packed = w.reshape(b // scheme[0], k, scheme[0] // 2)  # [blocks, K, R/2]
    q = torch.empty(k, b, dtype=torch.uint8)
    low, high = _nibbles(q, scheme, b // scheme[0], k)
    torch.bitwise_and(packed, 15, out=low)
    torch.bitwise_right_shift(packed, 4, out=high)
    return q


def pack(q: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """q [N, K] in 0..15 (N a multiple of the scheme's R) -> uint8 [N, K / 2] in ``scheme``:
    what torch's packer for that instruction set writes (``tests/test_quant_int4_layout.py``)."""
    n, k = q.shape
    qt = q.t().to(torch.uint8).contiguous()  # [K, N]
    low, high = _nibbles(qt, scheme, n // scheme[0], k)
    return torch.bitwise_or(low, high << 4).contiguous().view(n, k // 2)


@functools.cache
def scheme_of_layout(layout: str) -> Scheme | None:
    """The scheme of a ``cpu_layout`` string ('<capability>-<fingerprint>'): the one whose
    packing of ``layout_probe()`` has that fingerprint; None when none has."""
    fingerprint = layout.rpartition("-")[2]
    probe = layout_probe()
    for scheme in SCHEMES:
        if layout_fingerprint(pack(probe, scheme)) == fingerprint:
            return scheme
    return None
