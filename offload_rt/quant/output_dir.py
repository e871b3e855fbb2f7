"""The output folder of ``offload-rt quantize``: checked up front, written elsewhere, renamed
into place only when complete.

Files are written into a hidden sibling ``.partial-NAME-PID-XXXX`` of OUT_DIR (same file system,
so the final ``rename`` is atomic) and flushed to disk before it; an interrupted or failed run
deletes it, so OUT_DIR either does not exist or is complete. (A killed process, SIGKILL or power
loss, can leave the hidden folder behind; it never looks like a model folder.)
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from offload_rt.engine.sizes import format_size
from offload_rt.errors import OptionError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _size(n: int) -> str:
    return f"{format_size(n)} ({n:,} bytes)"


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_target(out_dir: Path, model_dir: Path, force: bool) -> None:
    """Refuse an OUT_DIR that is a file, holds the source, or is not empty (unless ``force``);
    ``OptionError`` naming it."""
    out, src = out_dir.resolve(), model_dir.resolve()
    if _is_inside(src, out):  # --force would delete the source
        raise OptionError(f"{out_dir}: OUT_DIR is or holds the source model folder "
                          f"{model_dir}; give another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise OptionError(f"{out_dir}: OUT_DIR exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OptionError(f"{out_dir}: OUT_DIR exists and is not empty; give another folder, "
                          "or --force to replace it")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(out_dir: Path) -> int:
    """Bytes free for an unprivileged user on OUT_DIR's file system (``shutil.disk_usage``)."""
    return shutil.disk_usage(_existing_ancestor(out_dir)).free


def check_space(out_dir: Path, needed: int) -> None:
    """``OptionError`` naming OUT_DIR when its file system has less than ``needed`` bytes free
    (an OUT_DIR replaced by --force is counted as still there: it is deleted last)."""
    free = free_bytes(out_dir)
    if free < needed:
        raise OptionError(f"{out_dir}: not enough disk space: the quantized checkpoint needs "
                          f"{_size(needed)}, the file system has {_size(free)} free")


def write_error(out_dir: Path, needed: int, exc: OSError) -> OptionError:
    """The error for an ``OSError`` while writing OUT_DIR: disk full says how much is needed."""
    if exc.errno in _DISK_FULL:
        return OptionError(f"{out_dir}: disk full while writing ({exc.strerror}): the quantized "
                           f"checkpoint needs {_size(needed)}, {_size(free_bytes(out_dir))} "
                           "free now (the partial output was removed)")
    return OptionError(f"{out_dir}: cannot write the quantized checkpoint: {exc} (the partial "
                       "output was removed)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(partial: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished ``partial`` folder to OUT_DIR (replacing it when ``force``)."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:  # created while we were writing
            raise OptionError(f"{out_dir}: OUT_DIR appeared and is not empty; the quantized "
                              "checkpoint was not moved there (give --force to replace it)")
        old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.rename(partial, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def staged_folder(out_dir: Path, needed: int, force: bool) -> Iterator[Path]:
    """A fresh hidden folder next to OUT_DIR to write into; renamed to OUT_DIR when the block
    ends normally, deleted when it raises (``KeyboardInterrupt`` included, re-raised). An
    ``OSError`` becomes ``OptionError`` naming OUT_DIR (``write_error``)."""
    partial = out_dir.parent / f".partial-{out_dir.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise write_error(out_dir, needed, exc) from exc
    try:
        yield partial
        _fsync_dir(partial)
        _commit(partial, out_dir, force)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(out_dir, needed, exc) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
