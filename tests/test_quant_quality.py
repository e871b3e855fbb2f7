"""Quantized experts stay close to the float model (a sanity check, not a benchmark).

On a tiny random model (unit-scale weights, 64 positions, float32 compute, bfloat16 scales):
int8 logits within 1% of the logits' spread, the same argmax at >= 95% of positions and the
same greedy tokens; int4 within 15%, the same argmax at >= 75% of positions and the same
first 8 greedy tokens. Both errors are
nonzero and ordered (int8 < int4; int4 with groups of 32 < groups of 128): the formats really
quantize, and the group size is honoured. Measured on seed 71: int8 mean |diff| 0.0055 (std of
the logits 0.99), argmax 98%; int4 0.076, 89%.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=128, intermediate_size=256,
                num_heads=4, num_kv_heads=2, vocab_size=256, seed=71)
IDS = torch.randint(0, SPEC.vocab_size, (64,), generator=torch.Generator().manual_seed(1))
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("quality"), SPEC)


def run(model_dir: Path, **options: object) -> tuple[torch.Tensor, list[int]]:
    with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=128,
                         **options) as rt:
        logits = rt.model(IDS, 0)
        tokens = rt.generate(IDS[:8].tolist(), max_new_tokens=NEW_TOKENS,
                             ignore_eos=True).token_ids
    return logits, tokens


@pytest.fixture(scope="module")
def results(model_dir: Path) -> dict[str, tuple[torch.Tensor, list[int]]]:
    return {"float": run(model_dir), "int8": run(model_dir, experts="int8"),
            "int4": run(model_dir, experts="int4", group_size=32),
            "int4g128": run(model_dir, experts="int4", group_size=128)}


def _error(results: dict[str, tuple[torch.Tensor, list[int]]], name: str) -> float:
    """Mean |logit difference| from the float model, relative to the float logits' spread."""
    want = results["float"][0]
    return float((results[name][0] - want).abs().mean() / want.std())


def _argmax_agreement(results: dict[str, tuple[torch.Tensor, list[int]]], name: str) -> float:
    return float((results[name][0].argmax(-1) == results["float"][0].argmax(-1)).float().mean())


def test_int8_is_close_to_float(results: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    assert 0 < _error(results, "int8") < 0.01
    assert _argmax_agreement(results, "int8") >= 0.95
    assert results["int8"][1] == results["float"][1]


def test_int4_is_near_float(results: dict[str, tuple[torch.Tensor, list[int]]]) -> None:
    assert _error(results, "int8") < _error(results, "int4") < 0.15
    assert _argmax_agreement(results, "int4") >= 0.75
    assert results["int4"][1][:8] == results["float"][1][:8]  # seed 71: the first 9 agree


def test_smaller_int4_groups_are_closer(results: dict[str, tuple[torch.Tensor, list[int]]]
                                        ) -> None:
    assert _error(results, "int4") < _error(results, "int4g128")
