"""Slot storage: one buffer per tier, allocated once at start-up, cut into fixed slots.

Every slot starts on an ``ALIGN`` boundary and has ``ALIGN`` bytes of slack, so an expert can
be placed at any byte phase inside it: the reader puts an expert where its address is congruent
to its file offset modulo ``ALIGN`` and the disk then DMAs straight into the slot
(``direct_io``). ``slot_bytes`` is what one slot costs; the memory plan counts that.
"""

from __future__ import annotations

import torch

from offload_rt.direct_io import ALIGN


def slot_bytes(numel: int, itemsize: int) -> int:
    """Bytes one slot of a ``numel``-element expert takes, alignment slack included."""
    return -(-(numel * itemsize + ALIGN) // ALIGN) * ALIGN


class SlotPool:
    """Fixed storage for ``count`` packed experts. Pinned (page-locked) when it feeds a GPU."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device,
                 pin_memory: bool = False) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.numel, self.itemsize = numel, itemsize
        self.row = slot_bytes(numel, itemsize) // itemsize  # elements per slot
        # One extra ALIGN so the first slot can start on a boundary whatever the allocator gave.
        self.storage = torch.empty(count * self.row + ALIGN // itemsize, dtype=dtype,
                                   device=device, pin_memory=pin_memory and device.type == "cpu")
        self.base = (-self.storage.data_ptr()) % ALIGN // itemsize
        self.count = count
        self._phase = [0] * count  # element offset of each slot's expert inside the slot

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, slot: int) -> torch.Tensor:
        """The packed expert held in ``slot`` (1-D, ``numel`` elements)."""
        start = self.base + slot * self.row + self._phase[slot]
        return self.storage[start: start + self.numel]

    def place(self, slot: int, phase_bytes: int) -> torch.Tensor:
        """Put ``slot``'s next expert ``phase_bytes`` (< ALIGN) past the slot's aligned start;
        returns its buffer. Only the thread filling the slot calls this."""
        if not 0 <= phase_bytes < ALIGN or phase_bytes % self.itemsize:
            raise ValueError(f"phase {phase_bytes} must be a multiple of {self.itemsize} "
                             f"below {ALIGN}")
        self._phase[slot] = phase_bytes // self.itemsize
        return self[slot]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
