"""Grouped-query attention with RoPE and a preallocated KV cache, full or sliding-window; the
families' q/k/v biases, q/k norms and clamping (``ModelConfig`` parts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offload_rt.config import ModelConfig
from offload_rt.model.norm import RMSNorm
from offload_rt.model.params import Linear
from offload_rt.model.rope import apply_rope


class KVCache:
    """Keys and values of one layer for its last ``capacity`` positions, allocated once.

    Position p lives in slot ``p % capacity``. Without a sliding window the capacity is the
    whole context, so slot = position. With a window W < context the capacity is W and the
    buffer rolls (mistral-inference's RotatingBufferCache): it always holds the W latest
    positions, which is everything a new token may attend to, and KV memory stays W positions
    however long the context.
    """

    def __init__(self, n_kv: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.capacity = capacity
        self.k = torch.zeros(n_kv, capacity, head_dim, dtype=dtype, device=device)  # [KV, C, D]
        self.v = torch.zeros(n_kv, capacity, head_dim, dtype=dtype, device=device)  # [KV, C, D]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v [KV, T, D] of positions start..start+T-1; return the keys and values the
        new tokens attend over [KV, S, D] and, when T > 1, the position of each of them [S]
        (one new token may see every key held: they are all within its window)."""
        t, cap = k.shape[1], self.capacity
        end = start + t
        if end <= cap or t == 1:  # the new rows fit in place (or one row overwrites the oldest)
            slot = start % cap
            self.k[:, slot:slot + t] = k
            self.v[:, slot:slot + t] = v
            held = min(end, cap)
            positions = self._positions(end - 1, held, k.device) if t > 1 else None
            return self.k[:, :held], self.v[:, :held], positions
        # A chunk that runs past a full window: its first rows still need keys it would evict,
        # so it attends over [held keys; its own], then only its last `cap` rows are kept.
        held = min(start, cap)
        keys = torch.cat((self.k[:, :held], k), dim=1)  # [KV, held + T, D]
        values = torch.cat((self.v[:, :held], v), dim=1)
        positions = torch.cat((self._positions(start - 1, held, k.device),
                               torch.arange(start, end, device=k.device)))
        kept = min(t, cap)
        slots = torch.arange(end - kept, end, device=k.device) % cap
        self.k[:, slots] = k[:, t - kept:]
        self.v[:, slots] = v[:, t - kept:]
        return keys, values, positions

    def _positions(self, last: int, held: int, device: torch.device) -> torch.Tensor:
        """Positions in slots 0..held-1 once position ``last`` was written last: slot s holds
        the latest p <= last with p % capacity == s."""
        slots = torch.arange(held, device=device)
        return last - torch.remainder(last - slots, self.capacity)


class Attention(nn.Module):
    """The config's parts: q/k/v biases (``qkv_bias``), an RMSNorm of q and k per head or over
    the whole projection (``qk_norm``), q/k/v clamped after it (``clip_qkv``)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window, self.clip = cfg.sliding_window, cfg.clip_qkv
        h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wq = Linear(h, q, device, cfg.qkv_bias)  # weight [Hq*D, H] (bias [Hq*D])
        self.wk = Linear(h, kv, device, cfg.qkv_bias)  # weight [Hkv*D, H] (bias [Hkv*D])
        self.wv = Linear(h, kv, device, cfg.qkv_bias)  # weight [Hkv*D, H] (bias [Hkv*D])
        self.wo = Linear(q, h, device)  # weight [H, Hq*D]
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(cfg.head_dim if per_head else q, cfg.rms_norm_eps, device)
            self.k_norm = RMSNorm(cfg.head_dim if per_head else kv, cfg.rms_norm_eps, device)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, H] -> q [Hq, T, D], k and v [Hkv, T, D], normed and clamped as configured
        (OLMoE: norm over the projection, then clamp; Qwen3-MoE: norm per head)."""
        t = x.shape[0]
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [T, Hq*D], [T, Hkv*D], [T, Hkv*D]
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        q = q.view(t, self.n_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.n_kv, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(t, self.n_kv, self.head_dim)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def forward(self, x: torch.Tensor, start_pos: int, cache: KVCache,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H] at positions start_pos..start_pos+T-1; cos/sin: [T, D]. Returns [T, H]."""
        t = x.shape[0]
        q, k, v = self._qkv(x)  # [Hq, T, D], [Hkv, T, D], [Hkv, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values, key_pos = cache.update(k, v, start_pos)  # [Hkv, S, D]
        mask = None
        if key_pos is not None:  # several new tokens: causal, and within the window
            rows = torch.arange(start_pos, start_pos + t, device=x.device)[:, None]
            mask = key_pos[None, :] <= rows  # [T, S]
            if self.window is not None:  # transformers' sliding_window_overlay: i - W < j
                mask &= key_pos[None, :] > rows - self.window
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                             enable_gqa=self.n_heads != self.n_kv)  # [1, Hq, T, D]
        return self.wo(out[0].transpose(0, 1).reshape(t, self.n_heads * self.head_dim))
