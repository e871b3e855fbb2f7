"""Where an expert's packed buffer starts: one rule for every holder of expert weights.

Why a rule at all: CPU matrix kernels give different bits for the same numbers at different
memory addresses. MKL's single-row float32 kernel (``sgemv``, a decode step or an expert that
got one token of a prefill) on an AMD EPYC with AVX-512 rounds differently when the weight's
address is not a multiple of 16 bytes (``benchmarks/alignment_probe.py``); Intel documents the
same of its other kernels ("Conditional Numerical Reproducibility": results depend on the
alignment of the arrays). An expert read by ``O_DIRECT`` must sit at its file offset's phase
modulo ``ALIGN`` (``direct_io``), which is any multiple of its item size, while a fresh tensor
is 64-byte aligned. So the resident model and the cache would hand the same expert to a kernel
at different alignments and get different logits.

The rule: an expert's buffer starts ``phase(key)`` bytes past an ``ALIGN`` boundary, a function
of the checkpoint, the compute dtype and the device only, never of the path (resident, device
slot, host slot, warm or cold reads, a substituted reader). Kernels then see every expert at
the same address modulo ``ALIGN`` (4096, far above any vector or cache-line peeling) in every
run, and offloading cannot change the bits. ``tests/test_expert_placement.py`` checks the
addresses themselves, so a path that breaks the rule fails on any CPU, not only on one whose
kernels are sensitive.

* ``read_phase``: where a slot that the disk fills holds the expert: the file offset's phase
  when the file dtype is the compute dtype (the disk DMAs straight into it), else 0 (the bytes
  are converted on the way anyway).
* ``compute_phase``: where kernels read it: ``read_phase`` on a CPU, whose RAM slots are what
  the disk fills; 0 on a GPU (device slots are filled by a copy; GPU kernels prefer aligned
  weights).
"""

from __future__ import annotations

from typing import Protocol

import torch

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.direct_io import ALIGN


class Placement(Protocol):
    def read_phase(self, key: ExpertKey) -> int: ...

    def compute_phase(self, key: ExpertKey) -> int: ...


class ExpertPlacement:
    """Phases (bytes past an ``ALIGN`` boundary) of ``ckpt``'s experts held in ``dtype`` for
    kernels on ``device``."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self._phases: dict[ExpertKey, int] = {}

    def read_phase(self, key: ExpertKey) -> int:
        """Phase of ``key`` in a RAM slot the disk writes: its first matrix's file offset
        modulo ``ALIGN`` when that matrix is stored in the compute dtype, else 0."""
        phase = self._phases.get(key)
        if phase is None:
            first = self.ckpt.expert(key.layer, key.expert).matrices[0]
            phase = first.offset % ALIGN
            if first.dtype != self.dtype or phase % self._itemsize:
                phase = 0
            self._phases[key] = phase
        return phase

    def compute_phase(self, key: ExpertKey) -> int:
        """Phase of ``key`` where kernels read it (resident buffers, device slots)."""
        return self.read_phase(key) if self.device.type == "cpu" else 0


class AlignedPlacement:
    """Every expert at phase 0: for engines fed by synthetic readers (no checkpoint)."""

    def read_phase(self, key: ExpertKey) -> int:
        return 0

    def compute_phase(self, key: ExpertKey) -> int:
        return 0
