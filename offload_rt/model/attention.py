"""Grouped-query attention with RoPE and a preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offload_rt.config import ModelConfig
from offload_rt.model.params import Linear
from offload_rt.model.rope import apply_rope


class KVCache:
    """Keys and values of one layer for up to ``max_len`` positions, allocated once."""

    def __init__(self, n_kv: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.k = torch.zeros(n_kv, max_len, head_dim, dtype=dtype, device=device)  # [KV, S, D]
        self.v = torch.zeros(n_kv, max_len, head_dim, dtype=dtype, device=device)  # [KV, S, D]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wq = Linear(h, q, device)  # weight [Hq*D, H]
        self.wk = Linear(h, kv, device)  # weight [Hkv*D, H]
        self.wv = Linear(h, kv, device)  # weight [Hkv*D, H]
        self.wo = Linear(q, h, device)  # weight [H, Hq*D]

    def forward(self, x: torch.Tensor, start_pos: int, cache: KVCache,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H] at positions start_pos..start_pos+T-1; cos/sin: [T, D]. Returns [T, H]."""
        t = x.shape[0]
        q = self.wq(x).view(t, self.n_heads, self.head_dim).transpose(0, 1)  # [Hq, T, D]
        k = self.wk(x).view(t, self.n_kv, self.head_dim).transpose(0, 1)  # [Hkv, T, D]
        v = self.wv(x).view(t, self.n_kv, self.head_dim).transpose(0, 1)  # [Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = start_pos + t
        cache.k[:, start_pos:end] = k
        cache.v[:, start_pos:end] = v
        keys, values = cache.k[:, :end], cache.v[:, :end]  # [Hkv, S, D]
        mask = None
        if t > 1:  # causal within the new tokens; all cached positions are visible
            rows = torch.arange(start_pos, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device)[None, :] <= rows  # [T, S]
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                             enable_gqa=self.n_heads != self.n_kv)  # [1, Hq, T, D]
        return self.wo(out[0].transpose(0, 1).reshape(t, self.n_heads * self.head_dim))
