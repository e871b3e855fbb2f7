"""Allocation failures at start-up as ``BudgetError``: what could not be allocated, how many
bytes, how much the process could still get, and the flag that would fit.

torch reports a failed allocation as ``RuntimeError: ... DefaultCPUAllocator: can't allocate
memory`` (CPU), ``torch.OutOfMemoryError`` (CUDA) or a pinned-memory ``RuntimeError``; Python
as ``MemoryError``; a thread whose stack cannot be mapped as ``RuntimeError: can't start new
thread``. The budget is planned from available RAM (or the flags), which does not see a
process limit (``ulimit -v``, ``prlimit --as``) or a container's cgroup limit; those are
measured here, after the fact, to say what would fit.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from offload_rt.config import ModelConfig
from offload_rt.engine.budget import MemoryPlan
from offload_rt.engine.sizes import format_size
from offload_rt.errors import BudgetError

MARGIN = 16 * 2**20  # left unplanned in a suggested budget: thread stacks, allocator slack
_OOM_TEXT = ("can't allocate memory", "out of memory", "cannot allocate memory",
             "can't start new thread", "cudaHostAlloc", "CUDA error: out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or isinstance(exc, RuntimeError) and any(
        text in str(exc) for text in _OOM_TEXT)


@dataclass(frozen=True)
class Headroom:
    """Bytes the process can still allocate, and the limit that says so."""

    nbytes: int
    source: str


def _cgroup_headroom() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def headroom(device: torch.device) -> Headroom:
    """The smallest of: the address-space limit (RLIMIT_AS) minus what is mapped, the cgroup
    limit minus its usage, available RAM; on CUDA the device's free memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return Headroom(free, "free GPU memory")
    found = [Headroom(psutil.virtual_memory().available, "available RAM")]
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(Headroom(soft - psutil.Process().memory_info().vms,
                              f"the process's address-space limit (ulimit -v) of "
                              f"{format_size(soft)}"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        found.append(Headroom(cgroup, "the container's memory limit (cgroup memory.max)"))
    return min(found, key=lambda h: h.nbytes)


def _fit_experts(plan: MemoryPlan, room: Headroom, flag: str, top_k: int) -> str:
    """The ``flag`` value whose plan fits ``room`` (measured with everything freed)."""
    fp = plan.footprint
    pools = plan.num_pools
    per_pool = (room.nbytes - fp.fixed - MARGIN) // (fp.slot * pools)
    if per_pool < top_k:
        return (f"not even {top_k * pools} expert slots fit: free memory or raise the limit")
    budget = (fp.fixed + per_pool * pools * fp.slot) // 2**20 * 2**20
    return f"try {flag} {budget // 2**20}MiB ({per_pool * pools} expert slots)"


def out_of_memory_error(exc: BaseException, stage: str, plan: MemoryPlan, cfg: ModelConfig,
                        *, device: torch.device, dtype: torch.dtype,
                        offloaded: bool) -> BudgetError:
    """A ``BudgetError`` for the allocation failure ``exc`` (``is_out_of_memory``) while
    loading ``stage`` ("trunk", "experts", "kv_cache"). Call it after freeing what the load
    built (and ``exc``'s traceback, whose frames hold it): the headroom it measures is then
    what a new load could get."""
    fp, room = plan.footprint, headroom(device)
    flag = "--gpu-memory" if device.type == "cuda" else "--cpu-memory"
    if stage == "trunk":
        what, nbytes = "the resident trunk (embeddings, attention, norms, routers)", fp.trunk
        half = ", or --dtype bfloat16 to halve it" if dtype == torch.float32 else ""
        advice = f"it cannot be offloaded: free memory or raise the limit{half}"
    elif stage == "kv_cache":
        what, nbytes = "the KV cache", fp.kv_cache
        advice = "lower --max-seq-len"
    else:
        slots = plan.device_slots if offloaded else cfg.num_layers * cfg.num_experts
        what = f"{slots} expert slots of {format_size(fp.slot)}" + ("" if offloaded else
                                                                    " (every expert resident)")
        nbytes = slots * fp.slot
        advice = _fit_experts(plan, room, flag, cfg.top_k)
        if plan.host_slots:
            what += f" and {plan.host_slots} pinned host slots (--cpu-memory)"
            nbytes += plan.host_slots * fp.slot
    planned = f" (planned within {flag} {format_size(plan.device_budget)})" \
        if plan.device_budget else ""
    return BudgetError(f"out of memory allocating {what}: {format_size(nbytes)} ({nbytes} "
                       f"bytes){planned}; {format_size(max(0, room.nbytes))} more could be "
                       f"allocated under {room.source}; {advice} ({type(exc).__name__}: {exc})")
