"""A runtime's memory plan from its options: the footprint, the budgets the flags give, the
slots they hold, and the checks that tie flags together (``--cache-experts`` within
[top_k, experts]; ``--no-offload`` within a sized budget)."""

from __future__ import annotations

import logging

import torch

from offload_rt.config import ModelConfig
from offload_rt.engine.budget import MemoryPlan, available_ram, footprint, plan_memory
from offload_rt.engine.hybrid import host_work_bytes
from offload_rt.engine.sizes import format_size, parse_size
from offload_rt.errors import BudgetError, OptionError
from offload_rt.options import POOL_CHOICE, RuntimeOptions, option_name
from offload_rt.quant.formats import ExpertFormat, FloatFormat

log = logging.getLogger(__name__)


def plan_runtime(o: RuntimeOptions, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                 max_seq_len: int, *, file_dtype: torch.dtype,
                 fmt: ExpertFormat | None = None) -> MemoryPlan:
    """Slots per tier for ``o`` (``BudgetError``/``OptionError`` naming the flags): slots of
    ``fmt``'s records (None: float experts in ``dtype``), read from ``file_dtype``."""
    if o.cache_experts is not None and not cfg.top_k <= o.cache_experts <= cfg.num_experts:
        raise OptionError(f"{option_name('cache_experts')} must be between top_k ({cfg.top_k}) "
                          f"and the number of experts ({cfg.num_experts}), got "
                          f"{o.cache_experts}")
    fp = footprint(cfg, dtype, max_seq_len, o.prefill_chunk, device_type=device.type,
                   file_dtype=file_dtype, fmt=fmt, trunk=o.trunk)
    gpu = parse_size(o.gpu_memory, option_name("gpu_memory"))
    cpu = parse_size(o.cpu_memory, option_name("cpu_memory"))
    on_gpu = device.type == "cuda"
    host = _host_budget(o, cfg, dtype, fmt, cpu) if on_gpu else None
    plan = plan_memory(cfg, fp, device, device_budget=gpu if on_gpu else cpu,
                       host_budget=host, cache_experts=o.cache_experts,
                       per_layer=POOL_CHOICE[o.pool])  # type: ignore[index]
    if o.offload is False and (gpu if on_gpu else cpu) is not None:
        _check_resident_fits(cfg, plan, "gpu_memory" if on_gpu else "cpu_memory")
    return plan


def _host_budget(o: RuntimeOptions, cfg: ModelConfig, dtype: torch.dtype,
                 fmt: ExpertFormat | None, cpu: int | None) -> int | None:
    """The host tier's budget on a GPU run: ``--cpu-memory`` (None: 'auto'), less, when
    misses may run on the CPU (``--hybrid`` not off), the RAM that computation takes
    (``engine.hybrid.host_work_bytes``)."""
    if o.hybrid == "off" or o.offload is False:
        return cpu
    fmt = fmt or FloatFormat(cfg.hidden_size, cfg.intermediate_size, dtype)
    work = host_work_bytes(cfg, fmt, dtype)
    total = cpu if cpu is not None else available_ram()
    log.info("hybrid: %s of %s RAM budget kept for experts computed on the CPU",
             format_size(work), option_name("cpu_memory"))
    return max(0, total - work)


def _check_resident_fits(cfg: ModelConfig, plan: MemoryPlan, budget: str) -> None:
    """``--no-offload`` with a sized budget (option ``budget``): every expert must fit it, or
    the budget would be silently exceeded (an 'auto' budget is not checked: resident is what
    was asked)."""
    total = cfg.num_layers * cfg.num_experts
    if plan.device_slots >= total:
        return
    fp = plan.footprint
    need = fp.fixed + total * fp.slot
    no_offload = option_name("offload", False)
    raise BudgetError(f"{no_offload} keeps all {total} experts resident: with the trunk, "
                      f"KV cache and work buffers that needs {format_size(need)} ({need} "
                      f"bytes), more than {option_name(budget)} "
                      f"{format_size(plan.device_budget or 0)}; raise --{budget.replace('_', '-')}"
                      f" or drop --no-offload to offload within it")
