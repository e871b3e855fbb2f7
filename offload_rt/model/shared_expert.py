"""The shared expert (Qwen2-MoE): one SwiGLU every token goes through beside its routed experts,
scaled by a sigmoid gate, ``sigmoid(gate x) * down(silu(gate_proj x) * up_proj x)``
(transformers' ``Qwen2MoeSparseMoeBlock``). Always active, so it is resident: part of the trunk
and its budget, never offloaded."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offload_rt.model.params import Linear


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, device: torch.device | str) -> None:
        super().__init__()
        self.w1 = Linear(hidden, inter, device)  # gate_proj [S, H]
        self.w3 = Linear(hidden, inter, device)  # up_proj [S, H]
        self.w2 = Linear(inter, hidden, device)  # down_proj [H, S]
        self.gate = Linear(hidden, 1, device)  # shared_expert_gate [1, H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] (normed) -> [T, H]."""
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return torch.sigmoid(self.gate(x)) * y
