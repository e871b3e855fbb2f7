"""Allocation failures at start-up as ``BudgetError``: what could not be allocated, how many
bytes, how much the process could still get, and the flag that would fit.

torch reports a failed allocation as ``RuntimeError: ... DefaultCPUAllocator: can't allocate
memory`` (CPU), ``RuntimeError: std::bad_alloc`` (a C++ allocation in a kernel),
``torch.OutOfMemoryError`` (CUDA) or a pinned-memory ``RuntimeError``; Python
as ``MemoryError``; a thread whose stack cannot be mapped as ``RuntimeError: can't start new
thread``. The budget is planned from available RAM (or the flags), which does not see a
process limit (``ulimit -v``, ``prlimit --as``) or a container's cgroup limit; those are
measured here, after the fact, to say what would fit.
"""

from __future__ import annotations

import errno
import itertools
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from offload_rt.config import ModelConfig
from offload_rt.engine.budget import MemoryPlan, plan_memory, slots_text
from offload_rt.engine.prefetch import PREFETCH_READERS
from offload_rt.engine.sizes import format_size
from offload_rt.errors import BudgetError
from offload_rt.options import POOL_CHOICE, RuntimeOptions, option_name

MARGIN = 16 * 2**20  # left unplanned in a suggested budget: allocator slack, small buffers
# glibc gives each thread that allocates a heap arena of its own (up to 8 per core), reserving
# 64 MiB of address space (HEAP_MAX_SIZE on 64-bit) that counts against RLIMIT_AS though little
# of it is ever touched: the prefetch thread and torch's intra-op threads need one each. Without
# counting them a suggested budget failed ~1 run in 10 under a busy CPU.
ARENA_ADDRESS_SPACE = 64 * 2**20
DEFAULT_STACK = 8 * 2**20  # a thread's stack when RLIMIT_STACK is unlimited (an upper bound)
# matched without regard to case; std::bad_alloc: a failed C++ allocation inside a kernel (seen
# in scaled_dot_product_attention under `prlimit --as`)
_OOM_TEXT = ("can't allocate memory", "out of memory", "cannot allocate memory",
             "can't start new thread", "cudahostalloc", "std::bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """``exc`` or an exception it was raised from (``__cause__``: an expert load's
    ``LoaderError`` wraps its reader's failure) is an allocation failure: a ``MemoryError``,
    an ``OSError`` with ``ENOMEM``, or a ``RuntimeError`` whose text says so (``_OOM_TEXT``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError) or isinstance(cause, OSError) and \
                cause.errno == errno.ENOMEM or isinstance(cause, RuntimeError) and any(
                    text in str(cause).lower() for text in _OOM_TEXT):
            return True
        cause = cause.__cause__
    return False


@dataclass(frozen=True)
class Headroom:
    """Bytes the process can still allocate, and the limit that says so."""

    nbytes: int
    source: str


def _arena_heaps(maps: str) -> int:
    """glibc heap arenas in ``maps`` (``/proc/self/maps``): an anonymous read-write mapping
    starting on a 64 MiB boundary followed by the reserved (``---p``) rest of its 64 MiB. A
    heap grown to its full size is not counted (the estimate then errs towards less room)."""
    rows = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) == 5:  # no path: anonymous
            start, end = (int(a, 16) for a in fields[0].split("-"))
            rows.append((start, end, fields[1]))
    return sum(1 for (s0, e0, p0), (s1, e1, p1) in itertools.pairwise(rows)
               if s0 % ARENA_ADDRESS_SPACE == 0 and p0.startswith("rw") and p1 == "---p"
               and e0 == s1 and e1 == s0 + ARENA_ADDRESS_SPACE)


def missing_arena_bytes() -> int:
    """Address space that arenas not yet made will reserve: one per thread that may allocate
    (torch's intra-op threads besides the caller, and the prefetch thread), at most 8 per core
    (glibc's default ``M_ARENA_MAX``), less the arenas already mapped."""
    wanted = min(torch.get_num_threads(), 8 * (psutil.cpu_count() or 1))
    try:
        have = _arena_heaps(Path("/proc/self/maps").read_text())
    except OSError:
        have = 0
    return max(0, wanted - have) * ARENA_ADDRESS_SPACE


def thread_stack_bytes() -> int:
    """Address space the prefetch threads' stacks reserve when the engine starts them (after
    its slots are allocated, so the advice must leave it free): ``PREFETCH_READERS`` stacks
    of ``threading.stack_size()`` when set, else glibc's default, the soft ``RLIMIT_STACK``
    (8 MiB assumed when that is unlimited; glibc then takes less)."""
    size = threading.stack_size()
    if not size:
        soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
        size = DEFAULT_STACK if soft == resource.RLIM_INFINITY else soft
    return PREFETCH_READERS * size


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
        arenas, stacks = missing_arena_bytes(), thread_stack_bytes()
        found.append(Headroom(soft - psutil.Process().memory_info().vms - arenas - stacks,
                              f"the process's address-space limit (ulimit -v) of "
                              f"{format_size(soft)}, less {format_size(arenas)} of other "
                              f"threads' malloc arenas and {format_size(stacks)} of the "
                              "prefetch threads' stacks"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        found.append(Headroom(cgroup, "the container's memory limit (cgroup memory.max)"))
    return min(found, key=lambda h: h.nbytes)


def _fit_experts(plan: MemoryPlan, room: Headroom, cfg: ModelConfig, o: RuntimeOptions,
                 device: torch.device) -> str:
    """Options whose plan fits ``room`` (measured with everything freed): a per-layer pool
    of top_k or more slots per layer, else one global pool of top_k or more slots in all (what
    ``--pool auto`` picks in a smaller budget), each checked by planning it (``plan_memory``).
    A ``--cache-experts`` that fixes the slot count is lowered, or dropped; ``--no-offload``
    is dropped."""
    fp, layers, top_k = plan.footprint, cfg.num_layers, cfg.top_k
    usable = max(0, room.nbytes - fp.fixed - MARGIN)  # bytes left for expert slots
    per_layer = min(cfg.num_experts, usable // (fp.slot * layers))
    drop = f"drop {option_name('offload', False)} and " if o.offload is False else ""
    if o.cache_experts is not None:
        if top_k <= per_layer < o.cache_experts:
            return f"try {option_name('cache_experts', per_layer)}: {per_layer * layers} expert " \
                   f"slots, {per_layer} per layer"
        drop = f"drop {option_name('cache_experts')} and "
    budget_option = "gpu_memory" if device.type == "cuda" else "cpu_memory"
    for shared in (False, True) if o.pool != "global" else (True,):
        pools, cap = (1, cfg.num_experts * layers) if shared else (layers, cfg.num_experts)
        slots = min(cap, usable // (fp.slot * pools))
        if slots < top_k:
            continue
        mib = -(-(fp.fixed + slots * pools * fp.slot) // 2**20)  # rounded up: MARGIN covers it
        add_pool = shared and o.pool == "layer"
        fits = plan_memory(cfg, fp, device, device_budget=mib * 2**20,
                           host_budget=plan.host_budget, cache_experts=None,
                           per_layer=False if add_pool else POOL_CHOICE[o.pool])
        pool = f"{option_name('pool', 'global')} " if add_pool else ""
        return f"{drop}try {pool}{option_name(budget_option, f'{mib}MiB')}: {slots_text(fits)}"
    return (f"not even {top_k} expert slots fit (the fewest a run takes: top_k in one global "
            f"pool, {option_name('pool', 'global')}): free memory or raise the limit")


def out_of_memory_error(exc: BaseException, stage: str, plan: MemoryPlan, cfg: ModelConfig,
                        *, device: torch.device, dtype: torch.dtype, offloaded: bool,
                        options: RuntimeOptions) -> BudgetError:
    """A ``BudgetError`` for the allocation failure ``exc`` (``is_out_of_memory``) while
    loading ``stage`` ("trunk", "experts", "kv_cache") with ``options``. Call it after freeing
    what the load built (and ``exc``'s traceback, whose frames hold it): the headroom it
    measures is then what a new load could get."""
    fp, room = plan.footprint, headroom(device)
    flag = option_name("gpu_memory" if device.type == "cuda" else "cpu_memory")
    if stage == "trunk":
        what, nbytes = "the resident trunk (embeddings, attention, norms, routers)", fp.trunk
        half = f", or {option_name('dtype', 'bfloat16')} to halve it" \
            if dtype == torch.float32 else ""
        advice = f"it cannot be offloaded: free memory or raise the limit{half}"
    elif stage == "kv_cache":
        what, nbytes = "the KV cache", fp.kv_cache
        advice = f"lower {option_name('max_seq_len')}"
    else:
        slots = plan.device_slots if offloaded else cfg.num_layers * cfg.num_experts
        what = f"{slots} expert slots of {format_size(fp.slot)}" + ("" if offloaded else
                                                                    " (every expert resident)")
        nbytes = slots * fp.slot
        advice = _fit_experts(plan, room, cfg, options, device)
        if plan.host_slots:
            what += f" and {plan.host_slots} pinned host slots ({option_name('cpu_memory')})"
            nbytes += plan.host_slots * fp.slot
    planned = f" (planned within {flag} {format_size(plan.device_budget)})" \
        if plan.device_budget else ""
    return BudgetError(f"out of memory allocating {what}: {format_size(nbytes)} ({nbytes} "
                       f"bytes){planned}; {format_size(max(0, room.nbytes))} more could be "
                       f"allocated under {room.source}; {advice} ({type(exc).__name__}: {exc})")


def generation_out_of_memory_error(exc: BaseException, plan: MemoryPlan, *,
                                   device: torch.device, prompt_tokens: int,
                                   chunk: int) -> BudgetError:
    """A ``BudgetError`` for the allocation failure ``exc`` (``is_out_of_memory``) during a
    generation of a ``prompt_tokens``-token prompt prefilled ``chunk`` tokens at a time. The
    plan counted what a forward allocates, so memory outside the plan ran short: say how much
    could still be allocated and which flags leave more room."""
    room = headroom(device)
    flag = option_name("gpu_memory" if device.type == "cuda" else "cpu_memory")
    planned = f"the run was planned within {flag} {format_size(plan.device_budget)}" \
        if plan.device_budget else f"the run was planned within {flag} (auto)"
    return BudgetError(
        f"out of memory during generation (a {prompt_tokens}-token prompt, prefilled "
        f"{chunk} tokens at a time): {planned}, and only {format_size(max(0, room.nbytes))} "
        f"more could be allocated under {room.source}, so memory outside that plan ran short "
        f"(another process, or a process or container limit); free memory, or lower {flag} "
        f"so the plan leaves room for the rest of the machine; the runtime is still usable "
        f"({type(exc).__name__}: {exc})")
