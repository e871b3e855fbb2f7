"""``offload-rt quantize`` on the other families (before: it wrote Mixtral's tensor names, so a
quantized Qwen2-MoE, Qwen3-MoE or OLMoE folder exited 0 and then failed to load: "tensor
'model.layers.0.mlp.gate.weight' is missing"). The folder loads, runs offloaded exactly as
resident, and stays near the float model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import FamilySpec, make_family_checkpoint

import offload_rt
from offload_rt.quant.quantize import QuantizeSettings, quantize

SPECS = {
    "qwen2_moe": FamilySpec("qwen2_moe", num_experts=8, top_k=2, seed=41),
    "qwen3_moe": FamilySpec("qwen3_moe", num_experts=16, top_k=4, head_dim=16,
                            norm_topk_prob=True, seed=42),
    "olmoe": FamilySpec("olmoe", num_experts=16, top_k=4, clip_qkv=0.5, seed=43),
}
PROMPT = [3, 17, 5, 99, 42, 8, 64, 1]


def _logits(model_dir: Path, **options: object) -> torch.Tensor:
    """The prompt's logits [T, V] from one forward, then greedy tokens' (decode steps)."""
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=32, **options) as rt:
        logits = [rt.model(torch.tensor(PROMPT), 0)]
        for i in range(4):
            token = int(logits[-1][-1].argmax())
            logits.append(rt.model(torch.tensor([token]), len(PROMPT) + i))
        return torch.cat(logits)


@pytest.mark.parametrize("family", sorted(SPECS))
def test_a_quantized_folder_of_each_family_loads_and_runs(family: str, tmp_path: Path) -> None:
    spec = SPECS[family]
    source = make_family_checkpoint(tmp_path / "float", spec)
    out = tmp_path / "int8"
    quantize(source, out, QuantizeSettings("int8"))
    resident = _logits(out, offload=False)
    offloaded = _logits(out, cache_experts=spec.top_k, prefetch=1)
    assert torch.equal(offloaded, resident)
    # near the float model on the prompt (greedy tokens may differ after it)
    prompt, reference = resident[:len(PROMPT)], _logits(source, offload=False)[:len(PROMPT)]
    assert (prompt - reference).abs().max() < 0.1 * reference.abs().max()
