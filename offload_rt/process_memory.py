"""Resident memory of this process: what a budget is checked against.

A budget (``--cpu-memory``) covers what the model needs: trunk, KV cache, work buffers and expert
slots (``engine/budget.py``). The process needs more before any model is loaded: the Python
interpreter, torch and the runtime's modules (``process_baseline_rss``, ~220 MiB on this project's
machine). A run's peak resident set is then at most that baseline plus the budget plus a few
tens of MiB of library code pages and buffers first touched by the model's kernels
(``tests/test_rss_budget.py`` measures it). ``offload-rt bench`` prints both figures.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes: Linux's ``VmHWM``, else
    ``getrusage``'s ``ru_maxrss`` (kilobytes on Linux, bytes on macOS). ``VmHWM`` first:
    Linux carries ``ru_maxrss`` over from the parent across fork + exec."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def process_baseline_rss() -> int:
    """Resident bytes of the process before a model is loaded: Python, torch and the runtime's
    modules imported and one tiny tensor op run (torch sets up its allocator and thread pool
    on the first). What every run costs on top of its budget."""
    import torch

    import offload_rt.runtime  # noqa: F401  (the modules load() needs, imported once)

    (torch.ones(8) + 1).sum()
    return rss_bytes()


def release_freed_memory() -> None:
    """Hand memory freed to the C allocator back to the OS (glibc's ``malloc_trim(0)``; a no-op
    elsewhere). glibc keeps freed heap memory for reuse, so a load that frees a float tensor
    after quantizing it would otherwise still hold its pages in RSS when the next is read."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
