"""The output folder of ``offload-rt quantize``: checked up front, written elsewhere, renamed
into place only when complete.

Files are written into a hidden sibling ``.partial-NAME-PID-XXXX`` of OUT_DIR (same file system,
so the final ``rename`` is atomic) and flushed to disk before it; an interrupted or failed run
deletes it, so OUT_DIR either does not exist or is complete; SIGTERM counts as an interruption
while the folder is written (exit status 143). A process killed outright (SIGKILL, power loss)
leaves its hidden folder behind, up to the checkpoint's size: the next run into the same OUT_DIR
deletes those whose process is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import psutil

from offload_rt.engine.sizes import format_size
from offload_rt.errors import OptionError

log = logging.getLogger(__name__)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Terminated(SystemExit):
    """SIGTERM while a quantized folder is written: unwinds (deleting the partial folder) and
    exits with status 143 (128 + SIGTERM), as the signal would have."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises ``Terminated``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete ``.partial-NAME-PID-XXXX`` siblings of OUT_DIR whose process no longer runs (left
    by a killed run); returns them."""
    removed = []
    for path in out_dir.parent.glob(f".partial-{out_dir.name}-*-*"):
        pid = path.name[len(f".partial-{out_dir.name}-"):].rsplit("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted quantize run (process %s)", path, pid)
            removed.append(path)
    return removed


def _size(n: int) -> str:
    return f"{format_size(n)} ({n:,} bytes)"


def _is_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_target(out_dir: Path, model_dir: Path | None, force: bool) -> None:
    """Refuse an OUT_DIR that is a file, holds the source folder ``model_dir`` (None: the
    source is no folder), or is not empty (unless ``force``); ``OptionError`` naming it."""
    out = out_dir.resolve()
    if model_dir is not None and _is_inside(model_dir.resolve(), out):  # --force: source gone
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
    ``OSError`` becomes ``OptionError`` naming OUT_DIR (``write_error``). SIGTERM in the
    block raises ``Terminated``; hidden folders of killed runs are deleted first."""
    partial = out_dir.parent / f".partial-{out_dir.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if out_dir.parent.is_dir():
            remove_stale_partials(out_dir)
        partial.mkdir(parents=True)
    except OSError as exc:
        raise write_error(out_dir, needed, exc) from exc
    try:
        with _sigterm_unwinds():
            yield partial
            _fsync_dir(partial)
            _commit(partial, out_dir, force)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(out_dir, needed, exc) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
