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
from offload_rt.engine.sizes import format_size
from offload_rt.errors import BudgetError

AUTO_RAM_FRACTION = 0.85  # of available RAM when a budget is 'auto'
AUTO_GPU_MARGIN = 512 * 2**20  # left free on the GPU for the CUDA context and allocator slack


@dataclass(frozen=True)
class Footprint:
    """Bytes the model needs besides its experts."""

    trunk: int
    kv_cache: int
    work: int
    expert: int  # one packed expert, compute dtype

    @property
    def fixed(self) -> int:
        return self.trunk + self.kv_cache + self.work

    @property
    def slot(self) -> int:
        """One cache slot: an expert plus the slack that lets disk reads land aligned
        (``slots.slot_bytes``)."""
        return -(-(self.expert + ALIGN) // ALIGN) * ALIGN


@dataclass(frozen=True)
class MemoryPlan:
    footprint: Footprint
    device_slots_per_pool: int
    num_pools: int
    host_slots: int  # 0 on CPU-only runs
    device_budget: int | None
    host_budget: int | None

    @property
    def device_slots(self) -> int:
        return self.device_slots_per_pool * self.num_pools


def footprint(cfg: ModelConfig, dtype: torch.dtype, max_seq_len: int, chunk: int) -> Footprint:
    """Bytes of the trunk, KV cache and the largest activations of a ``chunk``-token forward."""
    item = torch.empty((), dtype=dtype).element_size()
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * h + (q + 2 * kv) * h + q * h + cfg.num_experts * h
    trunk = item * (cfg.num_layers * per_layer + h + cfg.vocab_size * h *
                    (1 if cfg.tie_word_embeddings else 2))
    kv_cache = item * 2 * cfg.num_layers * max_seq_len * kv
    # activations of one chunk: hidden copies, expert intermediates, attention scores, logits
    work = 4 * chunk * (8 * h + 3 * cfg.intermediate_size + cfg.num_heads * max_seq_len
                        + cfg.vocab_size) + 64 * 2**20 + ALIGN  # + aligning the slot storage
    return Footprint(trunk, kv_cache, work, item * cfg.expert_numel)


def available_ram() -> int:
    return int(psutil.virtual_memory().available * AUTO_RAM_FRACTION)


def available_gpu(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return max(0, free - AUTO_GPU_MARGIN)


def _slots(budget: int, fp: Footprint, pools: int, cap: int) -> int:
    return min(cap, max(0, (budget - fp.fixed) // (fp.slot * pools)))


def plan_memory(cfg: ModelConfig, fp: Footprint, device: torch.device, *,
                device_budget: int | None, host_budget: int | None,
                cache_experts: int | None, per_layer: bool | None) -> MemoryPlan:
    """Slots per tier within the budgets; ``BudgetError`` naming the minimum if impossible.

    ``per_layer=None`` picks per-layer pools when the budget holds top_k experts of every
    layer, else one global pool (e.g. Mixtral 8x7B in bf16 on a 12 GB GPU: 24 slots in all).
    """
    budget = device_budget if device_budget is not None else (
        available_gpu(device) if device.type == "cuda" else available_ram())
    if per_layer is None:
        per_layer = budget >= fp.fixed + cfg.top_k * cfg.num_layers * fp.slot
    pools = cfg.num_layers if per_layer else 1
    cap = cfg.num_experts if per_layer else cfg.num_experts * cfg.num_layers
    minimum = cfg.top_k
    need_min = fp.fixed + minimum * pools * fp.slot
    if budget < need_min:
        which = "--gpu-memory" if device.type == "cuda" else "--cpu-memory"
        raise BudgetError(
            f"{which} {format_size(budget)} cannot run this model: the trunk "
            f"({format_size(fp.trunk)}), KV cache ({format_size(fp.kv_cache)}), work buffers "
            f"({format_size(fp.work)}) and {minimum * pools} expert slots of {format_size(fp.slot)}"
            f" ({minimum} per {'layer' if per_layer else 'step'}) need at least "
            f"{format_size(need_min)} ({need_min} bytes); raise it or lower --max-seq-len")
    per_pool = _slots(budget, fp, pools, cap)
    if cache_experts is not None:
        per_pool = cache_experts if per_layer else cache_experts * cfg.num_layers
        if fp.fixed + per_pool * pools * fp.slot > budget and device_budget is not None:
            raise BudgetError(f"--cache-experts {cache_experts} needs "
                              f"{format_size(fp.fixed + per_pool * pools * fp.slot)}, more "
                              f"than the budget {format_size(budget)}")
    host_slots = 0
    if device.type == "cuda":
        host = host_budget if host_budget is not None else available_ram()
        host_slots = min(cfg.num_experts * cfg.num_layers, max(0, host - ALIGN) // fp.slot)
        if host_slots < cfg.top_k:
            need = cfg.top_k * fp.slot + ALIGN
            raise BudgetError(f"--cpu-memory {format_size(host)} cannot hold the {cfg.top_k} "
                              f"pinned staging slots of {format_size(fp.slot)} the GPU tier "
                              f"needs: give at least {format_size(need)} ({need} bytes)")
    return MemoryPlan(fp, per_pool, pools, host_slots, budget, host_budget)
