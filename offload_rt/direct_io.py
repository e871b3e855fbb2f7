"""Reading a file's byte range with ``O_DIRECT``: the disk DMAs straight into our buffer.

A buffered read copies every byte twice on the CPU (disk -> page cache -> buffer) and fills
the page cache, which then has to be dropped again. With ``O_DIRECT`` the kernel asks the
device to write into the destination memory itself: no copy on a core that expert compute
needs, nothing left in the page cache. The price is alignment: file offset, length and
memory address of a direct read must be multiples of ``ALIGN``. A tensor's bytes rarely
start on such a boundary, so a range is read in three parts:

    head  [offset, A)   O_DIRECT of its block into a small bounce buffer, then copied
    body  [A, B)        O_DIRECT straight into the destination, whose address is congruent
                        to the offset modulo ALIGN
    tail  [B, end)      like the head (< ALIGN bytes each)

with A and B the first and last ``ALIGN`` boundaries inside the range. Callers place their
destination so that ``address % ALIGN == offset % ALIGN`` (see ``SlotPool.place``); when it is
not, the whole range goes through the bounce buffer (a CPU copy, still no page cache). Where
the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the range is read
buffered without readahead and its pages are dropped afterwards.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from pathlib import Path

from offload_rt.errors import CheckpointError

log = logging.getLogger(__name__)

ALIGN = 4096  # covers logical block sizes up to 4 KiB, the common maximum
BOUNCE = 4 * 2**20  # chunk of a read that cannot land in place
_HAS_DIRECT = hasattr(os, "O_DIRECT")
_refused: set[Path] = set()  # files whose file system refused O_DIRECT: read buffered
_refused_lock = threading.Lock()


def direct_supported(path: Path) -> bool:
    return _HAS_DIRECT and path not in _refused


def _refuse(path: Path, exc: OSError) -> None:
    with _refused_lock:
        if path not in _refused:
            _refused.add(path)
            log.warning("%s: O_DIRECT refused (%s); expert reads go through the page cache "
                        "and are dropped after each read", path, exc)


def _pread_fully(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


def _drop(fd: int, offset: int, length: int) -> None:
    """Drop every page touching ``[offset, offset + length)``: DONTNEED on the exact range
    would keep the partial pages at its ends."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        first = offset // ALIGN * ALIGN
        os.posix_fadvise(fd, first, -(-(offset + length) // ALIGN) * ALIGN - first,
                         os.POSIX_FADV_DONTNEED)


def _read_buffered(path: Path, offset: int, view: memoryview, drop: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop and hasattr(os, "posix_fadvise"):  # no readahead past the range
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        _pread_fully(fd, view, offset, path)
        if drop:
            _drop(fd, offset, len(view))
    finally:
        os.close(fd)


def _read_bounced(fd: int, path: Path, offset: int, view: memoryview) -> None:
    """``view`` through an aligned bounce buffer (``fd`` is ``O_DIRECT``), one chunk at a
    time: the aligned blocks covering each chunk are read, then the chunk is copied out."""
    pos = 0
    size = min(BOUNCE, len(view)) + 2 * ALIGN  # the covering blocks of one chunk fit
    with mmap.mmap(-1, size) as bounce:  # page-aligned anonymous memory
        while pos < len(view):
            chunk_at = offset + pos
            start = chunk_at // ALIGN * ALIGN
            take = min(len(view) - pos, BOUNCE - (chunk_at - start))
            stop = -(-(chunk_at + take) // ALIGN) * ALIGN
            need, done = chunk_at + take - start, 0
            while done < need:  # the file may end inside the last block: a short read
                n = os.preadv(fd, [memoryview(bounce)[done: stop - start]], start + done)
                if n <= 0:
                    raise CheckpointError(f"{path}: unexpected end of file at byte "
                                          f"{start + done}")
                done += n
            view[pos: pos + take] = bounce[chunk_at - start: need]
            pos += take


def read_range(path: Path, offset: int, view: memoryview, address: int, *,
               direct: bool) -> bool:
    """Fill ``view`` (``address`` = its first byte's address) with ``path[offset:]``.

    ``direct``: bypass the page cache with ``O_DIRECT`` (where the file system refuses it: a
    buffered read whose pages are dropped); the disk writes straight into ``view`` when
    ``address`` and ``offset`` are congruent modulo ``ALIGN``, else through a bounce buffer.
    Without ``direct`` the page cache is used and kept. Returns whether the bytes went straight
    into ``view`` (zero copy). Errors name the file.
    """
    end = offset + len(view)
    if not direct or not direct_supported(path):
        try:
            _read_buffered(path, offset, view, drop=direct)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read bytes {offset}-{end}: {exc}") from exc
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise CheckpointError(f"{path}: cannot open: {exc}") from exc
        _refuse(path, exc)
        return read_range(path, offset, view, address, direct=direct)
    body_start = -(-offset // ALIGN) * ALIGN
    body_end = max(body_start, end // ALIGN * ALIGN)
    zero_copy = (address - offset) % ALIGN == 0 and body_end > body_start
    try:
        if not zero_copy:
            _read_bounced(fd, path, offset, view)
        else:
            _pread_fully(fd, view[body_start - offset: body_end - offset], body_start, path)
            if body_start > offset:
                _read_bounced(fd, path, offset, view[: body_start - offset])
            if end > body_end:
                _read_bounced(fd, path, body_end, view[body_end - offset:])
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise CheckpointError(f"{path}: cannot read bytes {offset}-{end}: {exc}") from exc
        _refuse(path, exc)
        return read_range(path, offset, view, address, direct=direct)
    finally:
        os.close(fd)
    return zero_copy
