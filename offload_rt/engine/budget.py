"""Turn memory budgets into slot counts, and refuse up front what cannot run.

Device budget = resident trunk + KV cache + work buffers + device expert slots. On CUDA the host
budget holds the pinned host slots (the RAM tier between disk and GPU). On a CPU-only machine the
device *is* RAM: there is one budget (``cpu_memory``) and no separate host tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from offload_rt.config import ModelConfig
from offload_rt.direct_io import ALIGN
from offload_rt.engine.expert_cache import pool_capacities
from offload_rt.engine.sizes import format_size
from offload_rt.engine.trunk_memory import int8_parts, trunk_bytes
from offload_rt.engine.work_memory import onednn_shapes, work_bytes
from offload_rt.errors import BudgetError
from offload_rt.options import option_name
from offload_rt.quant.formats import ExpertFormat

AUTO_RAM_FRACTION = 0.85  # of available RAM when a budget is 'auto'
AUTO_GPU_MARGIN = 512 * 2**20  # left free on the GPU for the CUDA context and allocator slack


@dataclass(frozen=True)
class Footprint:
    """Bytes the model needs besides its experts."""

    trunk: int
    kv_cache: int
    work: int
    expert: int  # one expert's buffer: packed float in the compute dtype, or its record
    kv_positions: int = 0  # positions each layer's KV cache holds
    kv_window: int | None = None  # set when those are a rolling sliding window
    kernels: int = 0  # GEMM library state kept per shape run (work_memory.onednn_shapes)
    trunk_int8: str | None = None  # the trunk parts held in int8 (trunk_memory); None: none

    @property
    def trunk_text(self) -> str:
        """'3.0 GiB', or for an int8 trunk '1.9 GiB, attention and LM head in int8'."""
        size = format_size(self.trunk)
        return size if self.trunk_int8 is None else f"{size}, {self.trunk_int8} in int8"

    @property
    def fixed(self) -> int:
        return self.trunk + self.kv_cache + self.work + self.kernels

    @property
    def slot(self) -> int:
        """One cache slot: an expert plus the slack that lets disk reads land aligned
        (``slots.slot_bytes``)."""
        return -(-(self.expert + ALIGN) // ALIGN) * ALIGN


@dataclass(frozen=True)
class MemoryPlan:
    """Slots per tier. Device pools: ``num_pools`` of ``device_slots_per_pool`` slots, of which
    the first ``device_extra_slots`` pools (layers 0, 1, ...) hold one slot more: the room a
    budget leaves after equal per-layer pools (``spare_slots``)."""

    footprint: Footprint
    device_slots_per_pool: int
    num_pools: int
    host_slots: int  # 0 on CPU-only runs
    device_budget: int | None
    host_budget: int | None
    device_extra_slots: int = 0  # < num_pools; 0 with one global pool

    @property
    def device_slots(self) -> int:
        return self.device_slots_per_pool * self.num_pools + self.device_extra_slots

    @property
    def pool_capacities(self) -> tuple[int, ...]:
        """Each device pool's slots, in pool (= layer) order."""
        return pool_capacities(self.device_slots_per_pool, self.num_pools,
                               self.device_extra_slots)


def footprint(cfg: ModelConfig, dtype: torch.dtype, max_seq_len: int, chunk: int, *,
              device_type: str = "cpu", file_dtype: torch.dtype | None = None,
              fmt: ExpertFormat | None = None, trunk: str = "float") -> Footprint:
    """Bytes of the trunk, KV cache and the largest activations of a ``chunk``-token forward.

    ``work`` is what a run allocates beyond weights and KV cache on ``device_type``
    (``work_memory.work_bytes``: the largest forward, sampling, expert-read buffers when
    ``file_dtype``, the experts' stored dtype, differs from what their slots hold), measured in
    ``tests/test_work_memory.py``. ``expert`` is one expert's bytes in its slot: ``fmt``'s
    ``nbytes`` (a record of an int8 or int4 ``fmt``), by default ``cfg.expert_numel`` elements
    of ``dtype``. ``trunk``: "float" (every trunk tensor in ``dtype``) or "int8" (its
    attention projections and LM head int8 with a scale per row: ``trunk_memory``, whose
    products also add to ``work``).

    The KV cache holds ``cfg.kv_positions(max_seq_len)`` positions per layer: all of them, or
    with a sliding window W < max_seq_len a rolling W (plus, while a prefill chunk runs past a
    full window, one layer's [W + chunk] keys and values), so a long context costs no more.
    """
    item = torch.empty((), dtype=dtype).element_size()
    kv = cfg.num_kv_heads * cfg.head_dim
    trunk_size = trunk_bytes(cfg, dtype, trunk)  # every resident tensor, a shared expert's too
    held = cfg.kv_positions(max_seq_len)
    kv_cache = item * 2 * cfg.num_layers * held * kv
    rolling = cfg.sliding_window if held < max_seq_len else None
    if rolling:  # a prefill chunk past a full window also attends over [window; chunk] keys
        kv_cache += item * 2 * (held + min(chunk, max_seq_len)) * kv  # one layer at a time
    work = work_bytes(cfg, dtype, max_seq_len, chunk, kv_positions=held,
                      device_type=device_type, file_dtype=file_dtype, fmt=fmt, trunk=trunk)
    expert = item * cfg.expert_numel if fmt is None else fmt.nbytes
    kernels = onednn_shapes(cfg, dtype, min(chunk, max_seq_len), fmt, trunk) \
        if device_type == "cpu" else 0
    return Footprint(trunk_size, kv_cache, work, expert, held, rolling, kernels,
                     int8_parts(cfg, trunk))


def _kv_text(fp: Footprint) -> str:
    """'512.0 MiB', or with a rolling window '4.0 MiB, a rolling window of 16 positions'."""
    size = format_size(fp.kv_cache)
    return f"{size}, a rolling window of {fp.kv_window} positions" if fp.kv_window else size


def _kernels_text(fp: Footprint) -> str:
    return f", GEMM kernels ({format_size(fp.kernels)})" if fp.kernels else ""


def plan_line(plan: MemoryPlan) -> str:
    """The start-up line of a plan, what the CLI logs with -v: 'memory: trunk (3.0 GiB), KV
    cache (512.0 MiB), work buffers (101.0 MiB) of a 48.0 GiB budget' (an int8 trunk: 'trunk
    (1.9 GiB, attention and LM head in int8)')."""
    fp = plan.footprint
    budget = f" of a {format_size(plan.device_budget)} budget" if plan.device_budget else ""
    return (f"memory: trunk ({fp.trunk_text}), KV cache ({_kv_text(fp)}), work buffers "
            f"({format_size(fp.work)}){_kernels_text(fp)}{budget}")


def available_ram() -> int:
    return int(psutil.virtual_memory().available * AUTO_RAM_FRACTION)


def available_gpu(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return max(0, free - AUTO_GPU_MARGIN)


def _shrink_hint(fp: Footprint, slots: int, per_layer: bool) -> str:
    """How to shrink the largest part of the minimum budget (the BudgetError's advice)."""
    parts = {"trunk": fp.trunk, "KV cache": fp.kv_cache, "work buffers": fp.work,
             "GEMM kernels": fp.kernels, "expert slots": slots * fp.slot}
    largest = max(parts, key=lambda k: parts[k])
    advice = {
        "trunk": f"a 16-bit {option_name('dtype')} halves it if it runs in float32" + (
            f", {option_name('trunk', 'int8')} about halves its attention and LM head"
            if fp.trunk_int8 is None else ""),
        "KV cache": (f"lower {option_name('max_seq_len')} (it grows with the positions it "
                     "holds)" if fp.kv_window is None else
                     f"lower {option_name('max_seq_len')} below the model's sliding window of "
                     f"{fp.kv_window} positions (the cache never holds more than the window)"),
        "GEMM kernels": f"lower {option_name('prefill_chunk')} (a load() option; oneDNN keeps "
                        "~0.7 MiB per matrix and row count up to a chunk's tokens) or "
                        f"{option_name('dtype', 'float32')}",
        "work buffers": f"lower {option_name('prefill_chunk')} (a load() option, 512 by "
                        "default: they grow with a prefill chunk's tokens) or "
                        f"{option_name('max_seq_len')}",
        "expert slots": (f"{option_name('pool', 'global')} needs top_k slots, not top_k per "
                         "layer" if per_layer else
                         f"a 16-bit {option_name('dtype')} halves them if they run in float32"),
    }[largest]
    return f"shrink the largest part, the {largest} ({format_size(parts[largest])}): {advice}"


def _slots(budget: int, fp: Footprint, pools: int, cap: int) -> int:
    return min(cap, max(0, (budget - fp.fixed) // (fp.slot * pools)))


def spare_slots(leftover: int, fp: Footprint, pools: int) -> int:
    """Slots the ``leftover`` bytes of equal per-layer pools still hold: fewer than ``pools``
    (else every pool would have got one), each given to one pool (``pool_capacities``), so
    no whole slot of the budget goes unused (Mixtral 8x7B's int4 experts in 19.2 GiB: 5 per
    layer and 18 more, where 1.6 GiB was left over)."""
    return min(pools - 1, max(0, leftover) // fp.slot)


def slots_text(plan: MemoryPlan) -> str:
    """'49 expert slots in one global pool', '160 expert slots, 5 per layer' or '178 expert
    slots, 5 per layer (6 in layers 0-17)'."""
    if plan.num_pools == 1:
        return f"{plan.device_slots} expert slots in one global pool"
    text = f"{plan.device_slots} expert slots, {plan.device_slots_per_pool} per layer"
    extra = plan.device_extra_slots
    if extra:
        layers = "layer 0" if extra == 1 else f"layers 0-{extra - 1}"
        text += f" ({plan.device_slots_per_pool + 1} in {layers})"
    return text


def plan_memory(cfg: ModelConfig, fp: Footprint, device: torch.device, *,
                device_budget: int | None, host_budget: int | None,
                cache_experts: int | None, per_layer: bool | None) -> MemoryPlan:
    """Slots per tier within the budgets; ``BudgetError`` naming the minimum if impossible.

    ``per_layer=None`` picks per-layer pools when the budget holds top_k experts of every
    layer, else one global pool (e.g. Mixtral 8x7B in bf16 on a 12 GB GPU: 24 slots in all).
    Per-layer pools sized by the budget get its whole slots: equal pools, then the fewer than
    one per layer that are left to the first layers (``spare_slots``); ``cache_experts`` sizes
    every pool exactly.
    """
    budget = device_budget if device_budget is not None else (
        available_gpu(device) if device.type == "cuda" else available_ram())
    if per_layer is None:
        per_layer = budget >= fp.fixed + cfg.top_k * cfg.num_layers * fp.slot
    pools = cfg.num_layers if per_layer else 1
    cap = cfg.num_experts if per_layer else cfg.num_experts * cfg.num_layers
    minimum = cfg.top_k
    need_min = fp.fixed + minimum * pools * fp.slot
    which = option_name("gpu_memory" if device.type == "cuda" else "cpu_memory")
    if budget < need_min:
        raise BudgetError(
            f"{which} {format_size(budget)} cannot run this model: the trunk "
            f"({fp.trunk_text}), KV cache ({_kv_text(fp)}), work buffers "
            f"({format_size(fp.work)}){_kernels_text(fp)} and {minimum * pools} expert slots "
            f"of {format_size(fp.slot)}"
            f" ({minimum} per {'layer' if per_layer else 'step'}) need at least "
            f"{format_size(need_min)} ({need_min} bytes); raise it, or "
            f"{_shrink_hint(fp, minimum * pools, per_layer)}")
    per_pool = _slots(budget, fp, pools, cap)
    if cache_experts is not None:
        per_pool = cache_experts if per_layer else cache_experts * cfg.num_layers
        if fp.fixed + per_pool * pools * fp.slot > budget and device_budget is not None:
            raise BudgetError(f"{option_name('cache_experts', cache_experts)} needs "
                              f"{format_size(fp.fixed + per_pool * pools * fp.slot)}, more "
                              f"than {which} {format_size(budget)}")
    extra = 0 if cache_experts is not None or not per_layer or per_pool >= cap else \
        spare_slots(budget - fp.fixed - per_pool * pools * fp.slot, fp, pools)
    host_slots = 0
    if device.type == "cuda":
        host = host_budget if host_budget is not None else available_ram()
        host_slots = min(cfg.num_experts * cfg.num_layers, max(0, host - ALIGN) // fp.slot)
        if host_slots < cfg.top_k:
            need = cfg.top_k * fp.slot + ALIGN
            raise BudgetError(f"{option_name('cpu_memory')} {format_size(host)} cannot hold "
                              f"the {cfg.top_k} pinned staging slots of {format_size(fp.slot)} "
                              f"the GPU tier needs: give at least {format_size(need)} ({need} "
                              "bytes)")
    return MemoryPlan(fp, per_pool, pools, host_slots, budget, host_budget, extra)
