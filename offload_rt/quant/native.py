"""offload_rt's C kernels: built from source with the machine's C compiler on first use, cached
per user, loaded with ctypes.

The kernels are plain C (``native/*.c``, no torch headers, so a build takes about a second) with
OpenMP for threads; torch is imported first, so the library's ``libgomp.so.1`` is the one torch
already loaded and shares its thread pool and ``torch.set_num_threads``. Instruction sets are
chosen at run time inside the C code (``__builtin_cpu_supports``), never by build flags: a
library built on one CPU runs on any x86-64 or other machine of the same kind.

Where: ``$OFFLOAD_RT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/offload_rt/kernels``, else
``~/.cache/offload_rt/kernels``; the file name carries a hash of the source, the compiler
command, its ``--version`` and the flags, so an upgrade rebuilds. The compiler is ``$CC`` or
``cc``. Written to a temporary file and renamed, so concurrent first uses never load a
half-written library; a ``.sha256`` beside it is checked before every load, so a damaged copy
is rebuilt instead of crashing the process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp.so.1 before a kernel library needs it)

from offload_rt.errors import OptionError

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("native")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-std=c11")


class KernelBuildError(OptionError):
    """A native kernel could not be built or loaded: names the compiler, the source and why."""


def cache_dir() -> Path:
    """Where built kernel libraries are kept (module docstring; a relative
    ``$XDG_CACHE_HOME`` is ignored, as the XDG specification says)."""
    own = os.environ.get("OFFLOAD_RT_KERNEL_CACHE", "").strip()
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "offload_rt" / "kernels"


def _compiler(what: str) -> list[str]:
    """``$CC`` split as a shell would (blank: ``cc``)."""
    text = os.environ.get("CC", "").strip() or "cc"
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise KernelBuildError(f"{what}: the compiler in CC ({text!r}) cannot be parsed ({exc}); "
                               "set CC to a compiler command such as 'gcc'") from exc


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``args`` with their output as text (undecodable bytes replaced); past ``timeout`` s the
    whole process group is killed (a compiler driver's children too) and TimeoutExpired
    raised."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace", start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _compiler_version(cc: list[str], what: str) -> str:
    try:
        done = _run([*cc, "--version"], 60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(
            f"{what} needs a C compiler to build its kernel from {SOURCES}, and "
            f"{shlex.join(cc)!r} could not run ({exc}): install one (Debian: apt install gcc) "
            "or set CC") from exc
    return done.stdout


def _digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(target: Path) -> bool:
    """Whether ``target`` is the library a build wrote: its sidecar ``.sha256`` (written after
    the library, both renamed into place) matches its bytes. A truncated or overwritten
    library would crash the process when loaded (SIGBUS), not raise."""
    try:
        return (target.with_suffix(".sha256").read_text().strip() == _digest_of(target))
    except OSError:
        return False


@functools.cache
def library(name: str, what: str) -> ctypes.CDLL:
    """The built library of ``native/<name>.c``, building it when the cache lacks it (or holds
    a damaged copy). ``what`` names the option that needs it in errors
    (``KernelBuildError``)."""
    source = SOURCES / f"{name}.c"
    cc = _compiler(what)
    key = "\0".join([source.read_text(), shlex.join(cc), _compiler_version(cc, what),
                     " ".join(FLAGS)])
    target = cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not _intact(target):
        _build(cc, source, target, what)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelBuildError(f"{what}: the kernel library {target}, built by "
                               f"{shlex.join(cc)}, did not load ({exc}); check the compiler "
                               "(CC), or delete the file to rebuild") from exc


def _build(cc: list[str], source: Path, target: Path, what: str) -> None:
    log.info("%s: building %s with %s into %s", what, source.name, shlex.join(cc), target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise KernelBuildError(f"{what}: cannot write the kernel cache {target.parent} ({exc}); "
                               "set OFFLOAD_RT_KERNEL_CACHE to a writable folder") from exc
    sidecar = f"{tmp}.sha256"
    try:
        done = _run([*cc, *FLAGS, "-o", tmp, str(source), "-lm"], 300)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:]) or "(no message)"
            raise KernelBuildError(f"{what}: building {source} with {shlex.join(cc)} failed "
                                   f"(exit {done.returncode}):\n{tail}")
        with open(tmp, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise KernelBuildError(f"{what}: {shlex.join(cc)} exited 0 but wrote no shared "
                                       f"library for {source}: is CC a C compiler?")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep others out of a shared cache
        Path(sidecar).write_text(_digest_of(Path(tmp)) + "\n")
        os.chmod(sidecar, 0o644)
        os.replace(tmp, target)
        os.replace(sidecar, target.with_suffix(".sha256"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"{what}: building {source} with {shlex.join(cc)} failed: "
                               f"{exc}") from exc
    finally:
        for leftover in (tmp, sidecar):
            if os.path.exists(leftover):
                os.unlink(leftover)
