"""RMSNorm, computed in float32 and cast back, as Mixtral's reference does."""

from __future__ import annotations

import torch
from torch import nn

from offload_rt.model.params import empty_param


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.eps = eps
        self.weight = empty_param(dim, device=device)  # [H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
