"""Reading a weight file's byte ranges with ``O_DIRECT``: the disk DMAs straight into our buffer.

Reads go through a ``WeightFile`` (opened once, at validation), so they get the bytes that
were validated and stop with a ``CheckpointError`` naming the file if it changed in place.

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
from offload_rt.weight_file import WeightFile

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


def _read_bounced(fd: int, path: Path, offset: int, view: memoryview) -> None:
    """``view`` through an aligned bounce buffer (``fd`` is ``O_DIRECT``), one chunk at a
    time: the aligned blocks covering each chunk are read, then the chunk is copied out."""
    pos = 0
    size = min(BOUNCE, len(view)) + 2 * ALIGN  # the covering blocks of one chunk fit
    # page-aligned anonymous memory, used through a memoryview: slicing the mmap itself would
    # copy each chunk into a new bytes object (BOUNCE bytes more per read in flight, unplanned)
    with mmap.mmap(-1, size) as bounce, memoryview(bounce) as buf:
        while pos < len(view):
            chunk_at = offset + pos
            start = chunk_at // ALIGN * ALIGN
            take = min(len(view) - pos, BOUNCE - (chunk_at - start))
            stop = -(-(chunk_at + take) // ALIGN) * ALIGN
            need, done = chunk_at + take - start, 0
            while done < need:  # the file may end inside the last block: a short read
                n = os.preadv(fd, [buf[done: stop - start]], start + done)
                if n <= 0:
                    raise CheckpointError(f"{path}: unexpected end of file at byte "
                                          f"{start + done}")
                done += n
            view[pos: pos + take] = buf[chunk_at - start: need]
            pos += take


def _read_direct(fd: int, path: Path, offset: int, view: memoryview, address: int) -> bool:
    """The body straight into ``view`` when ``address`` has the offset's phase, the unaligned
    head and tail (or everything, when it has not) through the bounce buffer."""
    end = offset + len(view)
    body_start = -(-offset // ALIGN) * ALIGN
    body_end = max(body_start, end // ALIGN * ALIGN)
    if (address - offset) % ALIGN or body_end <= body_start:
        _read_bounced(fd, path, offset, view)
        return False
    _pread_fully(fd, view[body_start - offset: body_end - offset], body_start, path)
    if body_start > offset:
        _read_bounced(fd, path, offset, view[: body_start - offset])
    if end > body_end:
        _read_bounced(fd, path, body_end, view[body_end - offset:])
    return True


def _read(file: WeightFile, offset: int, view: memoryview, address: int, direct: bool) -> bool:
    path = file.path
    if direct and direct_supported(path):
        try:
            return _read_direct(file.descriptor(direct=True), path, offset, view, address)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _refuse(path, exc)  # the open or the first read said no: buffered from now on
    fd = file.descriptor(cached=not direct)
    _pread_fully(fd, view, offset, path)
    if direct:
        _drop(fd, offset, len(view))
    return False


def read_range(file: WeightFile | Path, offset: int, view: memoryview, address: int, *,
               direct: bool) -> bool:
    """Fill ``view`` (``address`` = its first byte's address) with ``file[offset:]``.

    ``file``: a ``WeightFile`` opened at validation (a bare path is opened for this one read).
    ``direct``: bypass the page cache with ``O_DIRECT`` (where the file system refuses it: a
    buffered read whose pages are dropped); the disk writes straight into ``view`` when
    ``address`` and ``offset`` are congruent modulo ``ALIGN``, else through a bounce buffer.
    Without ``direct`` the page cache is used and kept. Returns whether the bytes went straight
    into ``view`` (zero copy). Errors name the file; a file changed since it was opened is a
    ``CheckpointError`` saying so.
    """
    if isinstance(file, Path):
        with WeightFile(file) as opened:
            return read_range(opened, offset, view, address, direct=direct)
    with file.reading():
        try:
            zero_copy = _read(file, offset, view, address, direct)
        except (OSError, CheckpointError) as exc:
            file.check_unchanged()  # a changed file explains a short or failed read
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file.path}: cannot read bytes {offset}-"
                                  f"{offset + len(view)}: {exc}") from exc
        file.check_unchanged()  # after the read: a change before or during it is caught
    return zero_copy
