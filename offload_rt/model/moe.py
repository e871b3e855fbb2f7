"""The sparse MoE feed-forward layer: route, then run each chosen expert on its tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
    transformers' Qwen2-MoE adds it; None: none. Experts the source hands out in host RAM
    (``ExpertBuffers.on_host``: hybrid miss handling on a GPU run) are computed there by
    ``host_ffn`` first; their outputs join the sum at their place in the same order.
    """

    def __init__(self, layer: int, router: Router, experts: ExpertProvider,
                 ffn: ExpertFFN,
                 shared: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.layer, self.router, self.experts, self.ffn = layer, router, experts, ffn
        self.shared = shared
        # the experts a provider hands out in host RAM (``ExpertBuffers.on_host``) run here:
        # the same format's kernels, which pick the CPU's by the buffer's device
        self.host_ffn = ffn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] (already normed) -> [T, H]."""
        probs, top_w, top_ids = self.router(x)  # [T, E], [T, K], [T, K]
        self.experts.on_route(self.layer, probs, top_ids)
        if x.shape[0] == 1:
            return self._one_token(x, top_w, top_ids)
        return self._tokens(x, top_w, top_ids)

    def _tokens(self, x: torch.Tensor, top_w: torch.Tensor,
                top_ids: torch.Tensor) -> torch.Tensor:
        """Any number of tokens: each expert on the rows routed to it."""
        used = torch.unique(top_ids).tolist()  # sorted ascending
        out = torch.zeros_like(x)
        step = max(1, self.experts.max_group(self.layer))
        for start in range(0, len(used), step):
            group = used[start:start + step]
            with self.experts.acquire(self.layer, group) as buffers:
                on_host = getattr(buffers, "on_host", None)
                host_y = self._on_host(x, top_ids, on_host, buffers) if on_host else {}
                for e in group:
                    tok, kpos = torch.where(top_ids == e)
                    y = host_y[e] if e in host_y else self.ffn(x[tok], buffers[e])
                    # tok holds each token once per expert, so this equals index_add_, whose
                    # bf16 CPU scatter path took ~30 ms per decode row on a busy 2-core box
                    out[tok] += (y * top_w[tok, kpos, None]).to(out.dtype)
        return out if self.shared is None else out + self.shared(x)

    def _one_token(self, x: torch.Tensor, top_w: torch.Tensor,
                   top_ids: torch.Tensor) -> torch.Tensor:
        """A decode step: the same operations on the same values as ``_tokens``' loop
        (ascending ids, y * its weight as a [1, 1] tensor so that type promotion is the same,
        added in place of the one row), without its per-expert index searches."""
        ids = top_ids[0].tolist()  # distinct: top-k picks each expert once
        order = sorted(range(len(ids)), key=ids.__getitem__)
        out = torch.zeros_like(x)
        with self.experts.acquire(self.layer, [ids[k] for k in order]) as buffers:
            on_host = getattr(buffers, "on_host", None)
            host_y = self._on_host(x, top_ids, on_host, buffers) if on_host else {}
            for k in order:
                e = ids[k]
                y = host_y[e] if e in host_y else self.ffn(x, buffers[e])
                out += (y * top_w[0:1, k:k + 1]).to(out.dtype)
        return out if self.shared is None else out + self.shared(x)

    def _on_host(self, x: torch.Tensor, top_ids: torch.Tensor, experts: frozenset[int],
                 buffers: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """y [T_e, H] on x's device of each expert in ``experts``, computed by ``host_ffn``
        where its buffer sits (host RAM), before the device's experts are queued: x crosses
        once, each y comes back; the outputs are then added in ascending id order with the
        others', as always."""
        host = next(iter(buffers[e] for e in experts)).device
        x_host = x.to(host)
        ids_host = top_ids.to(host)
        out = {}
        for e in sorted(experts):
            tok = torch.where(ids_host == e)[0]
            out[e] = self.host_ffn(x_host[tok], buffers[e]).to(x.device)
        return out
