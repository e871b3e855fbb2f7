"""Every expert held in memory (the fully resident reference path), placed as the cache places
them, so the resident model and every offloaded run hand kernels identical addresses modulo
``ALIGN`` (see ``placement``)."""

from __future__ import annotations

import torch

from cache_policies import ExpertKey
from offload_rt.checkpoint import Checkpoint
from offload_rt.engine.placement import ExpertPlacement
from offload_rt.engine.slots import SlotPool
from offload_rt.model.build import Progress
from offload_rt.model.experts import ResidentExperts
from offload_rt.quant.formats import ExpertFormat
from offload_rt.quant.reader import reader_for


def load_resident(ckpt: Checkpoint, fmt: ExpertFormat, device: torch.device,
                  progress: Progress | None = None) -> ResidentExperts:
    """All experts of ``ckpt`` in ``fmt`` (float buffers in its dtype, or records: quantized
    once here when the folder holds float experts) in one slot storage on ``device``, each at
    its ``compute_phase``. Reads go through the page cache, as the trunk's do; on a GPU each
    expert is read into a host staging slot at its ``read_phase``, then copied."""
    cfg = ckpt.config
    placement = ExpertPlacement.for_format(ckpt, fmt, device)
    reader = reader_for(ckpt, fmt, direct=False)
    keys = [ExpertKey(i, e) for i in range(cfg.num_layers) for e in range(cfg.num_experts)]
    pool = SlotPool(len(keys), fmt.numel, fmt.storage_dtype, device)
    staging = None if device.type == "cpu" else \
        SlotPool(1, fmt.numel, fmt.storage_dtype, torch.device("cpu"))
    buffers = {}
    for slot, key in enumerate(keys):
        dst = pool.place(slot, placement.compute_phase(key))
        if staging is None:
            reader(key, dst)
        else:
            src = staging.place(0, placement.read_phase(key))
            reader(key, src)
            dst.copy_(src)
        buffers[(key.layer, key.expert)] = dst
        if progress is not None:
            progress(slot + 1, len(keys))
    return ResidentExperts(buffers, cfg.num_experts)
