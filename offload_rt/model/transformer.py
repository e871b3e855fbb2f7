"""The MoE decoder of every family: resident trunk + an expert provider for the MoE layers.
Which parts a block has (q/k/v biases, q/k norms, a shared expert, the router's rule) comes
from the ``ModelConfig`` its family read (``offload_rt.families``)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from offload_rt.config import ModelConfig
from offload_rt.model.attention import Attention, KVCache
from offload_rt.model.experts import ExpertFFN, ExpertProvider, expert_ffn
from offload_rt.model.moe import MoELayer
from offload_rt.model.norm import RMSNorm
from offload_rt.model.params import Embedding, Linear
from offload_rt.model.rope import rope_tables
from offload_rt.model.router import Router
from offload_rt.model.shared_expert import SharedExpert


class Block(nn.Module):
    """One decoder layer's resident weights. Its MoE experts live in the provider."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.attn = Attention(cfg, device)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.router = Router(cfg.hidden_size, cfg.num_experts, cfg.top_k, device,
                             cfg.norm_topk_prob)
        self.shared = SharedExpert(cfg.hidden_size, cfg.shared_expert_size, device) \
            if cfg.shared_expert_size else None


class Transformer(nn.Module):
    """Resident modules; ``attach`` gives it an expert provider (and the experts' kernel) and a
    KV cache to run."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "meta") -> None:
        """Parameters are uninitialized (on ``meta`` by default) until weights are assigned."""
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, device)  # weight [V, H]
        self.layers = nn.ModuleList(Block(cfg, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, device)  # weight [V, H]
        self.max_seq_len = 0
        self.expert_ffn: ExpertFFN = functools.partial(  # the float kernel, until attached
            expert_ffn, hidden=cfg.hidden_size, inter=cfg.intermediate_size)
        self._moe: list[MoELayer] = []
        self._caches: list[KVCache] = []

    def attach(self, experts: ExpertProvider, max_seq_len: int,
               ffn: ExpertFFN | None = None) -> None:
        """Wire the MoE layers to ``experts`` and allocate KV caches for a context of
        ``max_seq_len`` positions (``cfg.kv_positions`` of them: fewer with a sliding window).
        ``ffn``: how an expert is computed from the buffers ``experts`` hands out (its format's
        ``ffn``); None keeps the one attached before (at first the float ``expert_ffn``)."""
        cfg, p = self.cfg, self.embed.weight
        if ffn is not None:
            self.expert_ffn = ffn
        self._moe = [MoELayer(i, blk.router, experts, self.expert_ffn, blk.shared)
                     for i, blk in enumerate(self.layers)]
        held = cfg.kv_positions(max_seq_len)
        self._caches = [KVCache(cfg.num_kv_heads, held, cfg.head_dim, p.dtype, p.device)
                        for _ in self.layers]
        self._cos, self._sin = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_theta, p.device)
        self.max_seq_len = max_seq_len

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.nbytes for c in self._caches)

    def reset(self) -> None:
        """Forget the context. Positions are overwritten on the next forward, so no clearing."""

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, start_pos: int, *,
                last_only: bool = False) -> torch.Tensor:
        """token_ids: int64 [T] at positions start_pos.. -> float32 logits [T, V] ([1, V] for
        the last position only when ``last_only``: prefill needs no more)."""
        t = token_ids.shape[0]
        if start_pos + t > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + t - 1} exceed the context "
                             f"({self.max_seq_len})")
        cos, sin = self._cos[start_pos:start_pos + t], self._sin[start_pos:start_pos + t]
        h = self.embed(token_ids.to(self.embed.weight.device))  # [T, H]
        for blk, moe, cache in zip(self.layers, self._moe, self._caches):
            h = h + blk.attn(blk.attn_norm(h), start_pos, cache, cos, sin)
            moe.experts.observe(moe.layer, h)
            h = h + moe(blk.ffn_norm(h))
        if last_only:
            h = h[-1:]
        return self.lm_head(self.norm(h)).float()
