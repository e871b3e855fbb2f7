"""A safetensors file read by byte ranges, so one tensor can be read without touching the rest.

We parse the header ourselves (8-byte little-endian length + JSON) instead of using
``safe_open`` because the offloading engine needs the exact byte range of every tensor: it reads
one expert straight into a preallocated slot, optionally past the page cache (``direct_io``) so
a CPU-only machine really stays within its memory budget.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload_rt.direct_io import read_range
from offload_rt.errors import CheckpointError
from offload_rt.weight_file import WeightFile

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # fp8 checkpoints' weights (quant.fp8_tensors)
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, byte count, dtype and shape.
    ``file``: the open file its header was read from; reads go there (``WeightFile``)."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    file: WeightFile | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}")


def _parse_entry(file: WeightFile, name: str, entry: object, data_start: int,
                 data_len: int) -> TensorInfo:
    path = file.path
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _bad(path, f"corrupted header: entry for tensor '{name}' lacks dtype/shape/offsets")
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        quantized = str(entry["dtype"]).startswith(("F8", "F6", "F4"))  # fp8/fp6/fp4 formats
        hint = (": a quantized checkpoint, which is not supported; offload_rt reads "
                "float32/bfloat16/float16 safetensors, and F8_E4M3 weights of fp8 "
                "checkpoints") if quantized else ""
        raise _bad(path, f"tensor '{name}' has unsupported dtype {entry['dtype']!r}{hint}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)):
        raise _bad(path, f"corrupted header: bad shape or data_offsets for tensor '{name}'")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != numel * itemsize or begin < 0:
        raise _bad(path, f"corrupted header: tensor '{name}' offsets {offsets} do not match "
                         f"shape {shape} of {entry['dtype']}")
    if end > data_len:
        raise _bad(path, f"truncated file: tensor '{name}' ends at data byte {end} but the file "
                         f"holds only {data_len} data bytes")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, end - begin, file)


def _pread(file: WeightFile, nbytes: int, offset: int) -> bytes:
    data = os.pread(file.descriptor(), nbytes, offset)
    if len(data) < nbytes:  # a file still being written, or cut meanwhile
        raise _bad(file.path, f"truncated file: {file.size} bytes, but only {offset + len(data)}"
                              " could be read")
    return data


def read_header(file: WeightFile) -> dict[str, TensorInfo]:
    """Parse and validate the header of the open ``file``; every tensor's range must lie in
    the file. Its ``TensorInfo``s read from ``file`` later on."""
    path, size = file.path, file.size
    try:
        if size < 8:
            raise _bad(path, f"truncated file: {size} bytes, not a safetensors file")
        (hlen,) = struct.unpack("<Q", _pread(file, 8, 0))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise _bad(path, f"corrupted or truncated header: declares {hlen} header bytes "
                             f"but the file has {size} bytes")
        raw = _pread(file, hlen, 8)
    except OSError as exc:
        raise _bad(path, f"cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"corrupted header: not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _bad(path, "corrupted header: not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + hlen
    return {name: _parse_entry(file, name, entry, data_start, size - data_start)
            for name, entry in header.items()}


def writable_view(out: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no numpy needed)."""
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("read target must be a contiguous CPU tensor")
    nbytes = out.numel() * out.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")


def read_into(info: TensorInfo, out: torch.Tensor, *, drop_page_cache: bool = False) -> bool:
    """Read ``info``'s bytes into ``out`` (a CPU tensor of exactly ``info.nbytes`` bytes).

    ``drop_page_cache``: bypass the page cache (``direct_io``: ``O_DIRECT``, or a buffered read
    whose pages are dropped), so reading experts does not silently grow the machine's memory
    use. Returns whether the disk wrote straight into ``out`` (see ``direct_io.read_range``).
    """
    view = writable_view(out)
    if len(view) != info.nbytes:
        raise ValueError(f"target holds {len(view)} bytes, tensor '{info.name}' has {info.nbytes}")
    try:
        return read_range(info.file or info.path, info.offset, view, out.data_ptr(),
                          direct=drop_page_cache)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (tensor '{info.name}')") from exc


def read_tensor(info: TensorInfo, *, drop_page_cache: bool = False) -> torch.Tensor:
    """Read one tensor into freshly allocated memory, with its file dtype and shape."""
    out = torch.empty(info.shape, dtype=info.dtype)
    read_into(info, out, drop_page_cache=drop_page_cache)
    return out
