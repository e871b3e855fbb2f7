"""Weight-only modules whose parameters start uninitialized.

torch's nn.Linear / nn.Embedding run random initializers even on the ``meta`` device, which
pulls in torch's decomposition machinery (about 3 s of imports per process). Our weights always
come from the checkpoint, so parameters are created with ``torch.empty`` (on ``meta`` when the
model is built, then replaced by the file's tensors with ``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offload_rt.model.cpu_linear import linear


def empty_param(*shape: int, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight.T (+ bias when ``bias``: Qwen2-MoE's q/k/v projections)."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str,
                 bias: bool = False) -> None:
        super().__init__()
        self.weight = empty_param(out_features, in_features, device=device)  # [out, in]
        self.bias = empty_param(out_features, device=device) if bias else None  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, device: torch.device | str) -> None:
        super().__init__()
        self.weight = empty_param(vocab, dim, device=device)  # [V, H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
