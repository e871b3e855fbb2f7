"""How many of a file's pages sit in the page cache (``mincore`` on a mapping; Linux/POSIX).

The mapping is never touched, so asking does not fault anything in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_pages(path: Path, offset: int = 0, length: int | None = None) -> int:
    """Pages of ``path[offset: offset + length]`` (whole pages touching it) in the page cache."""
    size = os.path.getsize(path)
    length = size - offset if length is None else length
    if length <= 0:
        return 0
    start = offset // PAGE * PAGE
    span = offset + length - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = -(-span // PAGE)
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, span, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec)
        finally:
            _libc.munmap(addr, span)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop ``path``'s pages; written back first, since dirty pages cannot be dropped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
