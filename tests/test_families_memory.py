"""The work budget covers the families' block parts: a shared expert's activations (resident
and run on every token beside the routed experts) and the q/k norms' float32 copies.

Measured as ``tests/test_work_memory.py`` measures Mixtral's shapes (torch's allocations during
a real forward, ``torch.profiler``) and held to the same bounds:
measured <= ``work_memory.forward_peak`` <= 2 x measured + 1 MiB.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_work_memory import _config, _forward_peak, _model, assert_estimate_bounds

from offload_rt.engine import work_memory
from offload_rt.model import cpu_linear

CASES: dict[str, tuple[dict[str, Any], torch.dtype, int]] = {
    # a shared expert 8x the routed experts' width (Qwen1.5-MoE: 4x), prefill and decode
    "shared-expert-float32": ({"shared_expert_size": 2048, "norm_topk_prob": False,
                               "qkv_bias": True}, torch.float32, 256),
    "shared-expert-bf16": ({"shared_expert_size": 2048}, torch.bfloat16, 256),
    "shared-expert-decode": ({"shared_expert_size": 2048}, torch.bfloat16, 1),
    # wide q/k norms (Qwen3-MoE: per head; OLMoE: over the projection, clamped)
    "qk-norm-head": ({"qk_norm": "head", "num_heads": 32, "head_dim": 64}, torch.float32, 64),
    "qk-norm-projection": ({"qk_norm": "projection", "clip_qkv": 1.0, "num_heads": 32,
                            "head_dim": 64}, torch.bfloat16, 64),
}
RUNS = [(name, fp32) for name in CASES for fp32 in (False, True)
        if fp32 is False or CASES[name][1] == torch.bfloat16]


@pytest.mark.parametrize(("name", "fp32_path"), RUNS,
                         ids=[f"{n}{'-fp32path' if f else ''}" for n, f in RUNS])
def test_forward_peak_bounds_the_families_parts(name: str, fp32_path: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fields, dtype, tokens = CASES[name]
    monkeypatch.setattr(cpu_linear, "native_bf16", lambda: not fp32_path)
    cfg = _config(**fields)
    measured = _forward_peak(_model(cfg, dtype, tokens), tokens, 0)
    estimate = work_memory.forward_peak(cfg, dtype, tokens, tokens, threads=1)
    assert_estimate_bounds(measured, estimate)
