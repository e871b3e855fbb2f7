"""``Fp8Reader``: one fp8 expert from its checkpoint tensors into its record (``quant.fp8``).

An fp8 checkpoint stores each expert as six tensors (w1, w3, w2 in F8_E4M3 and their scales),
wherever its writer put them, so a record is filled by three weight reads, each straight into
its part of the record (the bytes are never converted; by ``O_DIRECT`` when the engine asks,
landing in place when the tensor's file offset is 4 KiB aligned, through the bounce buffer
otherwise) and three scale reads, converted to float32. The disk reads the checkpoint's bytes
(``nbytes``: the six tensors); the caches and links hold and move the record.
"""

from __future__ import annotations

import torch

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.quant.fp8 import Fp8Format
from offload_rt.quant.fp8_tensors import scale_rows
from offload_rt.safetensors_file import read_into


class Fp8Reader:
    """``reader(key, out)``: expert ``key`` of ``ckpt`` (an fp8 checkpoint whose experts are
    F8_E4M3) into ``out``, a record of ``fmt`` (uint8, ``fmt.nbytes``). Thread-safe: every call
    writes only its own ``out``."""

    def __init__(self, ckpt: Checkpoint, fmt: Fp8Format, *, direct: bool) -> None:
        self.ckpt, self.fmt, self.direct = ckpt, fmt, direct
        self.direct_matrices = 0  # weights the disk wrote straight into a record (statistics)

    def nbytes(self, key: ExpertKey) -> int:
        """Bytes of ``key`` in its files: three fp8 matrices and their scales."""
        return self.ckpt.expert(key.layer, key.expert).nbytes

    def __call__(self, key: ExpertKey, out: torch.Tensor) -> None:
        location = self.ckpt.expert(key.layer, key.expert)
        (w1, w3, w2), (s1, s3, s2) = location.parts, location.scales
        parts = self.fmt.layout.views(out)
        f = self.fmt.inter
        in_place = 0
        for info, dst in ((w1, parts["w13"][:f]), (w3, parts["w13"][f:]), (w2, parts["w2"])):
            in_place += read_into(info, dst, drop_page_cache=self.direct)
        s13 = parts["s13"]
        half = s13.shape[0] // 2
        s13[:half] = scale_rows(s1, (half, s13.shape[1]), drop_page_cache=self.direct)
        s13[half:] = scale_rows(s3, (half, s13.shape[1]), drop_page_cache=self.direct)
        parts["s2"][:] = scale_rows(s2, tuple(parts["s2"].shape), drop_page_cache=self.direct)
        self.fmt.layout.zero_padding(out)
        self.direct_matrices += in_place
