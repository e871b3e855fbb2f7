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
  when the file dtype is the slot's dtype (the disk DMAs straight into it) and the phase is a
  multiple of the alignment the expert's format needs, else 0 (the bytes are converted or
  encoded on the way, or bounced in: ``direct_io``). A float expert needs its item size; a
  record (``quant.record``) 64 bytes, so each of its typed parts (int8 or packed int4
  weights, 16-bit scales) is aligned for its dtype and vector loads (torch 2.13's CPU int8
  kernel crashed with a segmentation fault on a record at phase 200 on this project's AVX-512
  machine: ``tests/test_quant_placement.py``).
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
from offload_rt.quant.formats import ExpertFormat


class Placement(Protocol):
    def read_phase(self, key: ExpertKey) -> int: ...

    def compute_phase(self, key: ExpertKey) -> int: ...


class ExpertPlacement:
    """Phases (bytes past an ``ALIGN`` boundary) of ``ckpt``'s experts held in ``dtype`` (the
    slots' storage dtype) for kernels on ``device``. ``alignment``: bytes an expert's start
    must be a multiple of (default: ``dtype``'s item size; ``for_format`` takes the format's)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, *,
                 alignment: int | None = None) -> None:
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.alignment = alignment or torch.empty((), dtype=dtype).element_size()
        self._phases: dict[ExpertKey, int] = {}

    @classmethod
    def for_format(cls, ckpt: Checkpoint, fmt: ExpertFormat,
                   device: torch.device) -> ExpertPlacement:
        """The placement of ``fmt``'s records (float experts: the compute dtype's)."""
        return cls(ckpt, fmt.storage_dtype, device, alignment=fmt.alignment)

    def read_phase(self, key: ExpertKey) -> int:
        """Phase of ``key`` in a RAM slot the disk writes: its first part's file offset
        modulo ``ALIGN`` when that part is stored in the slot's dtype and the phase is a
        multiple of ``alignment``, else 0."""
        phase = self._phases.get(key)
        if phase is None:
            first = self.ckpt.expert(key.layer, key.expert).parts[0]
            phase = first.offset % ALIGN
            if first.dtype != self.dtype or phase % self.alignment:
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
