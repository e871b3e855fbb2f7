"""The sparse MoE feed-forward layer: route, then run each chosen expert on its tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload_rt.model.experts import ExpertFFN, ExpertProvider
from offload_rt.model.router import Router


class MoELayer:
    """Handed its router, expert source and expert kernel, so the source (resident/offloaded)
    and the experts' format (float, int8, int4) can be swapped.

    Experts run in ascending id order whatever the source, so every source gives bit-identical
    results; when the source can pin fewer experts than the tokens need (prefill at small cache
    capacity) they are taken in groups, still in ascending order. ``shared``: an always-active
    expert (resident, ``SharedExpert``) whose output is added after the routed experts', as
    transformers' Qwen2-MoE adds it; None: none.
    """

    def __init__(self, layer: int, router: Router, experts: ExpertProvider,
                 ffn: ExpertFFN,
                 shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.layer, self.router, self.experts, self.ffn = layer, router, experts, ffn
        self.shared = shared

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] (already normed) -> [T, H]."""
        probs, top_w, top_ids = self.router(x)  # [T, E], [T, K], [T, K]
        self.experts.on_route(self.layer, probs, top_ids)
        used = torch.unique(top_ids).tolist()  # sorted ascending
        out = torch.zeros_like(x)
        step = max(1, self.experts.max_group(self.layer))
        for start in range(0, len(used), step):
            group = used[start:start + step]
            with self.experts.acquire(self.layer, group) as buffers:
                for e in group:
                    tok, kpos = torch.where(top_ids == e)
                    y = self.ffn(x[tok], buffers[e])
                    # tok holds each token once per expert, so this equals index_add_, whose
                    # bf16 CPU scatter path took ~30 ms per decode row on a busy 2-core box
                    out[tok] += (y * top_w[tok, kpos, None]).to(out.dtype)
        return out if self.shared is None else out + self.shared(x)
