"""Writing safetensors files one tensor at a time, and the shard layout of a quantized folder.

``safetensors.torch.save_file`` needs every tensor in memory at once; a quantized Mixtral
8x7B is ~25 GB. Here a shard's header is computed up front from the names, dtypes and shapes
of its tensors (``ShardFile``), and each tensor's bytes are written at their offset as soon as
they exist, so memory holds one tensor plus the header.

Format (https://github.com/huggingface/safetensors, "Format"): 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then
the data section, tensors back to back with no holes (offsets relative to its start). The
format allows trailing spaces in the header; we pad it so the data section starts at a multiple
of ``ALIGN`` (4 KiB), and records (multiples of 4 KiB, written first) start 4 KiB-aligned in
the file, readable by ``O_DIRECT`` straight into a cache slot (docs/quantized_format.md).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_rt.direct_io import ALIGN
from offload_rt.safetensors_file import DTYPES, writable_view

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # torch.uint8 -> "U8"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: its name, dtype and shape (``nbytes`` follows)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def header_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None = None
                 ) -> tuple[bytes, dict[str, int]]:
    """The length prefix + JSON header (space-padded so the data section starts at a multiple
    of ``ALIGN``) for ``entries`` stored in this order, and each tensor's file offset."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    begin = 0
    for entry in entries:
        if entry.name in header:
            raise ValueError(f"tensor '{entry.name}' listed twice")
        header[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [begin, begin + entry.nbytes]}
        begin += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    data_start = 8 + len(raw)
    offsets, at = {}, data_start
    for entry in entries:
        offsets[entry.name] = at
        at += entry.nbytes
    return struct.pack("<Q", len(raw)) + raw, offsets


def file_bytes(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> int:
    """The size of the file ``ShardFile(path, entries, metadata)`` writes."""
    return len(header_bytes(entries, metadata)[0]) + sum(e.nbytes for e in entries)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):  # pwrite may write less than asked (signals, large counts)
        done += os.pwrite(fd, data[done:], offset + done)


class ShardFile:
    """A safetensors file being written: the header goes out at creation; ``write`` puts
    each tensor's bytes at its offset, in any order; ``close`` checks that every tensor was
    written and flushes the file to disk. Raises ``OSError`` as the file system does."""

    def __init__(self, path: Path, entries: list[TensorEntry],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._entries = {e.name: e for e in entries}
        header, self.offsets = header_bytes(entries, metadata)
        self.nbytes = len(header) + sum(e.nbytes for e in entries)
        self._pending = set(self._entries)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
        try:
            _pwrite_all(self._fd, memoryview(header), 0)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (its entry's dtype and shape, on the CPU) as ``name``."""
        entry = self._entries[name]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise ValueError(f"tensor '{name}': expected {entry.dtype} {list(entry.shape)}, got "
                             f"{tensor.dtype} {list(tensor.shape)}")
        _pwrite_all(self._fd, writable_view(tensor.contiguous()), self.offsets[name])
        self._pending.discard(name)

    def close(self) -> None:
        """Flush to disk and close; ``ValueError`` if a tensor was never written."""
        try:
            if self._pending:
                missing = sorted(self._pending)
                raise ValueError(f"{self.path}: tensors never written: {missing[:3]} "
                                 f"({len(missing)} in all)")
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without flushing (the file is about to be deleted). Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
