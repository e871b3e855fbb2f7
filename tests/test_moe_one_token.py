"""A decode step's MoE path (``MoELayer._one_token``) must give exactly the bits of the general
path (``_tokens``) for the same token: it only skips the routing searches. Type promotion is
one trap (y times its weight must round as the general path rounds), the order of the additions
another (with top_k >= 3 they round differently in another order)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt

SPEC = TinySpec(num_experts=8, top_k=4, num_layers=2, seed=31)  # >= 3: the order shows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("one_token"), SPEC)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("offload", [False, True])
def test_one_token_path_equals_the_general_path(model_dir: Path, dtype: str,
                                                offload: bool) -> None:
    options = {"cache_experts": SPEC.top_k} if offload else {"offload": False}
    with offload_rt.load(model_dir, dtype=dtype, max_seq_len=32, **options) as rt:
        gen = torch.Generator().manual_seed(7)
        for moe in rt.model._moe:
            for _ in range(16):
                x = torch.randn(1, SPEC.hidden_size, generator=gen).to(rt.dtype)
                _, top_w, top_ids = moe.router(x)
                fast = moe._one_token(x, top_w, top_ids)
                general = moe._tokens(x, top_w, top_ids)
                assert torch.equal(fast, general), (moe.layer, top_ids.tolist())
