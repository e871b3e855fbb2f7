"""Slot storage: one tensor [slots, expert_numel] per tier, allocated once at start-up."""

from __future__ import annotations

import torch


class SlotPool:
    """Fixed storage for ``count`` packed experts. Pinned (page-locked) when it feeds a GPU."""

    def __init__(self, count: int, numel: int, dtype: torch.dtype, device: torch.device,
                 pin_memory: bool = False) -> None:
        self.storage = torch.empty(count, numel, dtype=dtype, device=device,
                                   pin_memory=pin_memory and device.type == "cpu")  # [S, N]

    def __getitem__(self, slot: int) -> torch.Tensor:
        return self.storage[slot]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
