"""offload_rt's C kernels: built from source with the machine's C compiler on first use, cached
per user, loaded with ctypes.

The kernels are plain C (``native/*.c``, no torch headers, so a build takes about a second) with
OpenMP for threads; torch is imported first, so the library's ``libgomp.so.1`` is the one torch
already loaded and shares its thread pool and ``torch.set_num_threads``. Instruction sets are
chosen at run time inside the C code (``__builtin_cpu_supports``), never by build flags: a
library built on one CPU runs on any x86-64 or other machine of the same kind.

Where: ``$OFFLOAD_RT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/offload_rt/kernels``, else
``~/.cache/offload_rt/kernels``; the file name carries a hash of the source, the compiler's
version and the flags, so an upgrade rebuilds. The compiler is ``$CC`` or ``cc``. Written to a
temporary file and renamed, so concurrent first uses never load a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp.so.1 before a kernel library needs it)

from offload_rt.errors import OptionError

SOURCES = Path(__file__).with_name("native")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-std=c11")


class KernelBuildError(OptionError):
    """A native kernel could not be built or loaded: names the compiler, the source and why."""


def cache_dir() -> Path:
    """Where built kernel libraries are kept (module docstring)."""
    if os.environ.get("OFFLOAD_RT_KERNEL_CACHE"):
        return Path(os.environ["OFFLOAD_RT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "offload_rt" / "kernels"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _compiler_version(cc: list[str], what: str) -> str:
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(
            f"{what} needs a C compiler to build its kernel from {SOURCES}, and "
            f"{shlex.join(cc)!r} could not run ({exc}): install one (Debian: apt install gcc) "
            "or set CC") from exc
    return done.stdout.splitlines()[0] if done.stdout else ""


@functools.cache
def library(name: str, what: str) -> ctypes.CDLL:
    """The built library of ``native/<name>.c``, building it when the cache lacks it.
    ``what`` names the option that needs it in errors (``KernelBuildError``)."""
    source = SOURCES / f"{name}.c"
    cc = _compiler()
    digest = hashlib.sha256(source.read_bytes() + _compiler_version(cc, what).encode()
                            + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if not target.exists():
        _build(cc, source, target, what)
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelBuildError(f"{what}: the kernel library {target} did not load ({exc}); "
                               "delete it to rebuild") from exc


def _build(cc: list[str], source: Path, target: Path, what: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise KernelBuildError(f"{what}: cannot write the kernel cache {target.parent} ({exc}); "
                               "set OFFLOAD_RT_KERNEL_CACHE to a writable folder") from exc
    try:
        done = subprocess.run([*cc, *FLAGS, "-o", tmp, str(source), "-lm"],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise KernelBuildError(f"{what}: building {source} with {shlex.join(cc)} failed "
                                   f"(exit {done.returncode}):\n{tail}")
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"{what}: building {source} with {shlex.join(cc)} failed: "
                               f"{exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
