"""Expert weights as packed buffers, and the seam through which the MoE layer gets them.

One expert is one contiguous 1-D buffer ``[w1 | w3 | w2]`` (flattened row-major), or a quantized
record (``offload_rt.quant``), so moving an expert between tiers is a single copy. The MoE layer
never knows where a buffer came from: it is handed an ``ExpertProvider`` (all experts resident,
or the offloading engine's cache) and an ``ExpertFFN`` that computes an expert from its buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F

from offload_rt.model.cpu_linear import linear

# x [T, H] and one expert's buffer -> [T, H]: ``expert_ffn`` bound to the shapes, or a
# quantized format's ``ffn`` (``quant.formats``)
ExpertFFN = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expert_ffn(x: torch.Tensor, packed: torch.Tensor, hidden: int, inter: int) -> torch.Tensor:
    """SwiGLU expert on a packed buffer. x: [N, H] -> [N, H]."""
    gate_up = packed[: 2 * inter * hidden].view(2 * inter, hidden)  # [w1; w3]: [2F, H]
    down = packed[2 * inter * hidden:].view(hidden, inter)  # w2: [H, F]
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [N, F] each
    return linear(F.silu(gate) * up, down)


class ExpertBuffers(dict):
    """What ``ExpertProvider.acquire`` may hand out instead of a plain mapping: expert id ->
    buffer, and ``on_host``, the ids whose buffers sit in host RAM for the CPU to compute
    (hybrid miss handling, ``engine.hybrid``); the others are on the compute device."""

    def __init__(self, buffers: Mapping[int, torch.Tensor],
                 on_host: frozenset[int] = frozenset()) -> None:
        super().__init__(buffers)
        self.on_host = on_host


class ExpertProvider(Protocol):
    """Where the MoE layer gets expert weights from."""

    def max_group(self, layer: int) -> int:
        """How many experts of ``layer`` may be held (pinned) at once."""

    def acquire(self, layer: int, experts: Sequence[int]) -> AbstractContextManager[Mapping[int, torch.Tensor]]:
        """Packed buffers of ``experts`` (sorted ids), valid and pinned inside the context;
        an ``ExpertBuffers`` names those the CPU is to compute (``on_host``)."""

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        """The residual stream [T, H] entering ``layer``'s MoE, before its experts are needed:
        the hook for router-predicted prefetch of later layers."""

    def on_route(self, layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        """Routing of ``layer``: probs float32 [T, E], chosen ids [T, K] (traces, statistics)."""


class ResidentExperts:
    """Every expert held in memory: the fully resident reference path."""

    def __init__(self, buffers: Mapping[tuple[int, int], torch.Tensor], num_experts: int) -> None:
        self._buffers = dict(buffers)
        self._num_experts = num_experts

    def max_group(self, layer: int) -> int:
        return self._num_experts

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Mapping[int, torch.Tensor]]:
        yield {e: self._buffers[(layer, e)] for e in experts}

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        pass

    def on_route(self, layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        pass
