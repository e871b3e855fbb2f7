"""``benchmarks/make_checkpoint.py``'s Qwen3-MoE preset writes a real Qwen3-MoE folder.

The ``qwen3moe-small`` preset at a few hundredth of its width: transformers'
``Qwen3MoeForCausalLM`` loads the folder and computes our logits (float32, 1e-5), and the routing
check sees the picks spread over its 128 experts.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from checkpoint_factory import load_reference_model

import offload_rt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_checkpoint

IDS = [5, 99, 42, 8, 64, 1, 23, 77, 3, 17]
TINY_QWEN3 = replace(make_checkpoint.PRESETS["qwen3moe-small"], hidden=64, layers=2, heads=4,
                     kv_heads=2, head_dim=32, intermediate=32, vocab=256)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint.write_checkpoint(TINY_QWEN3, tmp_path_factory.mktemp("qwen3moe"))


def test_the_preset_is_qwen3_moe_shaped() -> None:
    p = make_checkpoint.PRESETS["qwen3moe-small"]
    assert (p.family, p.experts, p.top_k, p.head_size) == ("qwen3_moe", 128, 8, 128)
    assert p.head_size != p.hidden // p.heads


def test_transformers_reads_the_folder_as_qwen3_moe(qwen3_folder: Path) -> None:
    oracle = load_reference_model(qwen3_folder)
    assert type(oracle).__name__ == "Qwen3MoeForCausalLM"
    with torch.inference_mode():
        want = oracle(torch.tensor([IDS])).logits[0].float()
    with offload_rt.load(qwen3_folder, dtype="float32", offload=False) as rt:
        assert rt.config.family == "qwen3_moe" and rt.config.qk_norm == "head"
        got = rt.model(torch.tensor(IDS), 0)
    assert (got - want).abs().max().item() < 1e-5


def test_routing_spreads_over_the_128_experts(qwen3_folder: Path) -> None:
    """192 decode steps x top-8: most experts of every layer picked, none taking more than a
    tenth of a layer's picks (at this width a few stay unpicked: the check's ``ok`` needs all)."""
    routing = make_checkpoint.check_routing(qwen3_folder, tokens=192)
    for picks in routing["picks_per_layer"]:
        assert len(picks) == 128 and sum(p > 0 for p in picks) >= 112, picks
    assert routing["top_share"] < 0.1 and routing["distinct_tokens"] > 16, routing
