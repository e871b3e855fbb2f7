"""A record: named tensors laid out in one contiguous byte buffer.

Each part starts on a ``PART_ALIGN`` (64-byte) boundary, so a view of it is aligned for any
element type and vector width; the whole record is padded to ``ALIGN`` (4 KiB), so records
written back to back in a file all start on a block boundary and are read by ``O_DIRECT``
straight into their slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_rt.direct_io import ALIGN

PART_ALIGN = 64


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Part:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the record's start

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class RecordLayout:
    """Parts in the given order, each on a ``part_align`` boundary; ``nbytes`` is the padded
    record size."""

    def __init__(self, parts: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 part_align: int = PART_ALIGN) -> None:
        laid, offset = [], 0
        for name, dtype, shape in parts:
            part = Part(name, dtype, tuple(shape), offset)
            laid.append(part)
            offset = _round_up(offset + part.nbytes, part_align)
        self.parts = {p.name: p for p in laid}
        self.nbytes = _round_up(offset, ALIGN)

    def views(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of ``record`` (1-D uint8 of ``nbytes``; its start 64-byte aligned)."""
        if record.dtype != torch.uint8 or record.numel() != self.nbytes:
            raise ValueError(f"record must be {self.nbytes} uint8 bytes, got "
                             f"{record.numel()} {record.dtype}")
        return {p.name: record[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape)
                for p in self.parts.values()}

    def zero_padding(self, record: torch.Tensor) -> None:
        """Zero the bytes of ``record`` between its parts and after the last one (what ``pack``
        leaves zero), so a record filled in place holds exactly what ``pack`` makes."""
        end = 0
        for part in sorted(self.parts.values(), key=lambda p: p.offset):
            record[end:part.offset].zero_()
            end = part.offset + part.nbytes
        record[end:].zero_()

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A fresh record holding ``tensors`` (each of its part's dtype and shape)."""
        record = torch.zeros(self.nbytes, dtype=torch.uint8)
        views = self.views(record)
        for name, view in views.items():
            value = tensors[name]
            if value.dtype != view.dtype or tuple(value.shape) != tuple(view.shape):
                raise ValueError(f"part {name}: expected {view.dtype} {list(view.shape)}, got "
                                 f"{value.dtype} {list(value.shape)}")
            view.copy_(value)
        return record
