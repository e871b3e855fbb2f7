"""``WeightFile``: a weight file opened once, so every read gets the bytes that were validated.

Files were reopened by path on every read, so a same-size file renamed over a shard mid-run
(a re-download, a sync tool) was read without notice: wrong tokens, exit 0. Now each shard is
opened once, at ``Checkpoint.open`` (its header is parsed through that descriptor), and every
later read goes through it or through a descriptor reopened from it
(``/proc/self/fd/N``, the same inode even after a rename or delete):

* replaced by rename, or deleted: never seen; the old inode stays readable until we close it.
* overwritten in place (same inode): not preventable cheaply. Every read compares the file's
  size and modification time with those seen at open (one ``fstat``, ~1 us) and stops with a
  ``CheckpointError`` naming the file when they differ. A writer that restores the old
  modification time on a same-size file is not detected.

Descriptors: one per shard, plus one ``O_DIRECT`` (or no-readahead) descriptor per shard once
expert reads start; closed by ``close()`` once no read is in flight, or when the object is
garbage collected.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from offload_rt.errors import CheckpointError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _hint(exc: OSError) -> str:
    if exc.errno not in (errno.EMFILE, errno.ENFILE):
        return ""
    return ("; a model keeps up to two descriptors per weight file open while it runs: raise "
            "the limit on open files (ulimit -n) or close other runtimes")


def _close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class WeightFile:
    """An open weight file. ``descriptor()`` hands out descriptors of the inode opened here;
    reads run inside ``reading()`` and call ``check_unchanged()`` after the bytes arrived."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | _CLOEXEC)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read: {exc}{_hint(exc)}") from exc
        st = os.fstat(fd)
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._inode = (st.st_dev, st.st_ino)
        self._fds: dict[str, int] = {"cached": fd}
        self._lock = threading.Lock()
        self._active = 0  # reads in flight: close() leaves the descriptors to the last one
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)

    def descriptor(self, *, direct: bool = False, cached: bool = True) -> int:
        """The page-cached descriptor; ``direct``: an ``O_DIRECT`` one (``OSError`` EINVAL
        where the file system refuses it); ``cached=False``: a buffered one without readahead.
        Both are opened on first use, from the same inode."""
        kind = "direct" if direct else "cached" if cached else "uncached"
        with self._lock:
            fd = self._fds.get(kind)
            if fd is None:
                try:
                    fd = self._fds[kind] = self._reopen(direct)
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    raise CheckpointError(f"{self.path}: cannot open: {exc}{_hint(exc)}") \
                        from exc
                if kind == "uncached" and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def _reopen(self, direct: bool) -> int:
        """A new descriptor of the inode opened at load. Where reopening is not permitted
        (permissions changed since, a locked-down /proc): a duplicate of the page-cached one,
        or for ``O_DIRECT`` an ``EINVAL`` (the caller reads buffered, as where it is refused)."""
        flags = os.O_RDONLY | _CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            try:  # the open file itself, whatever its path now names
                return os.open(f"/proc/self/fd/{self._fds['cached']}", flags)
            except FileNotFoundError:  # no /proc: by path, then check it is the same inode
                fd = os.open(self.path, flags)
        except PermissionError as exc:
            if direct:
                raise OSError(errno.EINVAL, f"cannot reopen for O_DIRECT: {exc}") from exc
            return os.dup(self._fds["cached"])
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._inode:
            os.close(fd)
            raise CheckpointError(f"{self.path}: replaced by another file since it was "
                                  "loaded; load the model again")
        return fd

    def check_unchanged(self) -> None:
        """``CheckpointError`` naming the file if its size or modification time changed."""
        st = os.fstat(self._fds["cached"])
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
            raise CheckpointError(
                f"{self.path}: changed since it was loaded (overwritten in place: "
                f"{self.size} -> {st.st_size} bytes, modified {when}); its expert weights can "
                "no longer be trusted: load the model again")

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Brackets one read: the descriptors stay open until it ends."""
        with self._lock:
            if self._closed:
                raise CheckpointError(f"{self.path}: closed (the runtime that loaded it was "
                                      "closed); load the model again")
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._closed and not self._active:
                    self._finalizer()

    def close(self) -> None:
        """Close the descriptors now, or as the read in flight ends. Idempotent."""
        with self._lock:
            self._closed = True
            if not self._active:
                self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> WeightFile:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
