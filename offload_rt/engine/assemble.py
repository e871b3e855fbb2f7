"""Assemble an ``OffloadedExperts`` from a checkpoint, the trunk and a memory plan."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from cache_policies.base import CachePolicy
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.budget import MemoryPlan
from offload_rt.engine.expert_cache import ExpertCache
from offload_rt.engine.expert_reader import ExpertReader
from offload_rt.engine.hybrid import MAX_HOST_TOKENS, HybridRule, measure_costs
from offload_rt.engine.offloaded import OffloadedExperts, Reader, Tier
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.prefetch import NextLayerPredictor
from offload_rt.engine.prefetch_depth import AdaptiveDepth
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.transfer import CudaHostToDevice, HostToDevice
from offload_rt.model.transformer import Transformer
from offload_rt.quant.formats import ExpertFormat, FloatFormat
from offload_rt.quant.reader import QuantizingReader, reader_for

log = logging.getLogger(__name__)


def disk_reader(ckpt: Checkpoint, drop_page_cache: bool, fmt: ExpertFormat | None = None
                ) -> ExpertReader | QuantizingReader:
    """Reads one expert from the safetensors files into a slot of ``fmt`` (None: float in
    the file's dtype): straight in, or quantized on the way (``quant.reader``); with
    ``drop_page_cache`` by ``O_DIRECT``, bypassing the page cache."""
    if fmt is None:
        return ExpertReader(ckpt, direct=drop_page_cache)
    return reader_for(ckpt, fmt, direct=drop_page_cache)


def build_offloaded(ckpt: Checkpoint, trunk: Transformer, plan: MemoryPlan,
                    policy_factory: Callable[[], CachePolicy], *, dtype: torch.dtype,
                    device: torch.device, prefetch_depth: int, drop_page_cache: bool,
                    prefetch_floor: int | None = None, reader: Reader | None = None,
                    fmt: ExpertFormat | None = None, hybrid: str = "off") -> OffloadedExperts:
    """Slot pools of ``fmt``'s records (None: float experts in ``dtype``) allocated once,
    caches over them, and the prefetch predictor; on a GPU, with ``hybrid`` "auto" the rule
    for computing misses on the CPU measured on those slots (``engine.hybrid``), with
    "always" every miss of up to ``MAX_HOST_TOKENS`` tokens. ``prefetch_floor``: the depth
    adapts between it and ``prefetch_depth`` (``engine.prefetch_depth``); None: fixed."""
    cfg = ckpt.config
    fmt = fmt or FloatFormat(cfg.hidden_size, cfg.intermediate_size, dtype)
    numel, storage = fmt.numel, fmt.storage_dtype
    dev_cache = ExpertCache("device", plan.device_slots_per_pool, plan.num_pools, policy_factory,
                            extra_slots=plan.device_extra_slots)
    device_tier = Tier(dev_cache, SlotPool(dev_cache.num_slots, numel, storage, device))
    host_tier, h2d = None, HostToDevice()
    if device.type == "cuda":
        host_cache = ExpertCache("host", plan.host_slots, 1, policy_factory)
        host_tier = Tier(host_cache, SlotPool(plan.host_slots, numel, storage,
                                              torch.device("cpu"), pin_memory=True))
        h2d = CudaHostToDevice(device, dev_cache.num_slots)
    predictor = NextLayerPredictor([b.ffn_norm for b in trunk.layers],
                                   [b.router for b in trunk.layers], cfg.top_k)
    rule = None
    if host_tier is not None and hybrid != "off":
        rule = _hybrid_rule(hybrid, fmt, host_tier, device_tier, h2d, cfg.hidden_size, dtype)
        log.info("%s", rule.describe())
    return OffloadedExperts(device_tier, reader or disk_reader(ckpt, drop_page_cache, fmt),
                            plan.footprint.expert,
                            placement=ExpertPlacement.for_format(ckpt, fmt, device),
                            host=host_tier, h2d=h2d,
                            predictor=predictor, prefetch_depth=prefetch_depth,
                            per_layer=plan.num_pools > 1, hybrid=rule,
                            adaptive=AdaptiveDepth(prefetch_floor, prefetch_depth)
                            if prefetch_floor is not None and prefetch_depth > prefetch_floor
                            else None)


def _hybrid_rule(mode: str, fmt: ExpertFormat, host: Tier, device: Tier, h2d: HostToDevice,
                 hidden: int, dtype: torch.dtype) -> HybridRule:
    """"always": every miss of few tokens; "auto": the threshold the start-up timing gives
    (on host slot 0 and device slot 0, before any expert is loaded into them)."""
    if mode == "always":
        return HybridRule(MAX_HOST_TOKENS)
    costs = measure_costs(fmt, host.slots.place(0, 0), device.slots.place(0, 0), h2d, hidden,
                          dtype)
    return HybridRule(costs.max_tokens(), costs)
