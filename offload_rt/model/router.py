"""The MoE router: softmax in float32 over all experts, top-k, and the k weights renormalized to
sum to 1 (Mixtral; Qwen and OLMoE with ``norm_topk_prob``) or kept as the softmax gave them
(transformers' ``Qwen2MoeTopKRouter``/``Qwen3MoeTopKRouter``/``OlmoeTopKRouter``)."""

from __future__ import annotations

import torch
from torch import nn

from offload_rt.model.cpu_linear import padded_linear
from offload_rt.model.params import empty_param


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int,
                 device: torch.device | str = "cpu", norm_topk_prob: bool = True) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = empty_param(num_experts, hidden, device=device)  # [E, H]

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> float32 probabilities over all experts [T, E]."""
        return torch.softmax(padded_linear(x, self.weight).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (probs float32 [T, E], weights float32 [T, K] (summing to 1 per token
        when ``norm_topk_prob``), expert ids int64 [T, K])."""
        probs = self.probabilities(x)
        top_w, top_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return probs, top_w, top_ids
