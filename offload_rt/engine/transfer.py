"""Moving expert bytes host -> device. On CUDA: a dedicated copy stream ordered with events.

A device slot may still be read by kernels queued on the compute stream when the cache decides to
reuse it, so every release records a 'last use' event for the slot and the copy stream waits on
it before overwriting. The compute stream waits on the copy's event before using the slot. Only
per-event waits; never a device-wide synchronize.
"""

from __future__ import annotations

import torch


class HostToDevice:
    """Copies into device slots. The CPU-only variant is a plain copy and no-op ordering."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        dst.copy_(src)

    def released(self, slot: int) -> None:
        """The compute stream is done enqueuing work that reads ``slot``."""

    def ready(self, slot: int) -> None:
        """Make the compute stream wait until ``slot``'s last copy has landed."""


class CudaHostToDevice(HostToDevice):
    def __init__(self, device: torch.device, num_slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._last_use: list[torch.cuda.Event | None] = [None] * num_slots
        self._copied: list[torch.cuda.Event | None] = [None] * num_slots

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        """Enqueue ``src`` (pinned host) -> ``dst`` on the copy stream; returns once the copy
        has finished, so the caller may reuse ``src``. Waits on this copy's event only."""
        last_use = self._last_use[slot]
        with torch.cuda.stream(self.stream):
            if last_use is not None:
                self.stream.wait_event(last_use)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._copied[slot] = done
        done.synchronize()  # this event only: the host slot is free again after it

    def released(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._last_use[slot] = event

    def ready(self, slot: int) -> None:
        event = self._copied[slot]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
