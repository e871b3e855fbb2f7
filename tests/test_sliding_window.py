"""Sliding-window attention (config.json / params.json ``sliding_window``) equals transformers'.

transformers' Mixtral masks key j for query i unless ``i - W < j <= i`` (``masking_utils.
sliding_window_overlay`` and the causal mask): a token sees the W latest positions, its own
included; mistral-inference's RotatingBufferCache keeps the same W. A checkpoint with W = 16,
prompts of 40 tokens and 24 decode steps: every query past position 15 has keys outside its
window. In float32 the logits match ``MixtralForCausalLM`` to 1e-5 whether the prompt runs in
one forward or in chunks that straddle the window; greedy tokens are the oracle's; the
offloaded run is bit-identical to the resident one; the KV cache holds W positions only.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    make_mistral_checkpoint,
    reference_greedy,
    reference_logits,
)

import offload_rt
from offload_rt.engine.budget import footprint
from offload_rt.errors import BudgetError

WINDOW = 16
SPEC = TinySpec(sliding_window=WINDOW, num_layers=2, num_experts=4, top_k=2, seed=21)
PROMPT_LEN = 40
NEW_TOKENS = 24
CONTEXT = PROMPT_LEN + NEW_TOKENS  # max_seq_len: four windows
ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    hf_dir: Path
    mistral_dir: Path
    prompt: list[int]
    ref_logits: torch.Tensor  # [PROMPT_LEN, V]
    ref_greedy: list[int]  # NEW_TOKENS greedy tokens after the prompt


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    hf_dir = make_hf_checkpoint(tmp_path_factory.mktemp("sw_hf"), SPEC)
    mistral_dir = make_mistral_checkpoint(tmp_path_factory.mktemp("sw_mistral"), SPEC)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(1, SPEC.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    return Case(hf_dir, mistral_dir, prompt, reference_logits(hf_dir, prompt),
                reference_greedy(hf_dir, prompt, NEW_TOKENS))


@pytest.fixture(scope="module")
def runtime(case: Case) -> offload_rt.Runtime:
    return offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=CONTEXT)


def edited_copy(src: Path, dst: Path, file: str, **fields: object) -> Path:
    """A copy of a model folder with ``fields`` set (None: removed) in its config ``file``."""
    out = Path(shutil.copytree(src, dst))
    data = json.loads((out / file).read_text())
    for key, value in fields.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (out / file).write_text(json.dumps(data))
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_the_window_changes_the_oracle(case: Case, tmp_path: Path) -> None:
    """Else a runtime ignoring the window would pass every test below."""
    full = edited_copy(case.hf_dir, tmp_path / "full", "config.json", sliding_window=None)
    assert max_diff(reference_logits(full, case.prompt), case.ref_logits) > 0.1


def test_logits_match_transformers_across_the_window(case: Case,
                                                     runtime: offload_rt.Runtime) -> None:
    assert runtime.max_seq_len == CONTEXT  # the context is not cut to the window
    ours = runtime.model(torch.tensor(case.prompt), 0)
    assert max_diff(ours, case.ref_logits) <= ATOL


@pytest.mark.parametrize("chunk", [1, 5, 7, WINDOW, WINDOW + 1, 2 * WINDOW + 3])
def test_prefill_chunks_straddling_the_window(case: Case, runtime: offload_rt.Runtime,
                                              chunk: int) -> None:
    """Chunks that start inside a full window and end past it keep the keys their first rows
    need (5 and 7 straddle positions 15/16 and 31/32 mid-chunk; 17 and 35 overrun the
    window in one forward)."""
    ids = torch.tensor(case.prompt)
    pieces = [runtime.model(ids[i:i + chunk], i) for i in range(0, PROMPT_LEN, chunk)]
    assert max_diff(torch.cat(pieces), case.ref_logits) <= ATOL


@pytest.mark.parametrize("prefill_chunk", [512, 7])
def test_greedy_tokens_match_transformers(case: Case, prefill_chunk: int) -> None:
    """24 decode steps, each with the rolling cache full: transformers' DynamicCache keeps the
    window too, and its tokens are ours."""
    with offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=CONTEXT,
                         prefill_chunk=prefill_chunk) as rt:
        out = rt.generate(case.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == case.ref_greedy


def test_offloaded_is_bit_identical_to_resident(case: Case) -> None:
    """A 7-token-chunk prefill, then decode steps fed the reference tokens: equal logits."""
    feed = [*case.prompt, *case.ref_greedy]
    logits = {}
    for name, options in {"resident": {"offload": False},
                          "offloaded": {"cache_experts": SPEC.top_k, "prefetch": 1}}.items():
        with offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=CONTEXT,
                             prefill_chunk=7, **options) as rt:
            ids = torch.tensor(feed)
            steps = [rt.model(ids[i:i + 7], i) for i in range(0, PROMPT_LEN, 7)]
            steps += [rt.model(ids[p:p + 1], p) for p in range(PROMPT_LEN, len(feed) - 1)]
            logits[name] = steps
            out = rt.generate(case.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert out.token_ids == case.ref_greedy
            if name == "offloaded":
                assert rt.offloaded and out.stats["misses"] > 0
    assert all(torch.equal(a, b) for a, b in zip(logits["resident"], logits["offloaded"],
                                                 strict=True))


@pytest.mark.parametrize("window_field", [{"sliding_window": WINDOW},
                                          {"_sliding_window": WINDOW},
                                          {"sliding_window": [WINDOW, WINDOW]}])
def test_mistral_layout_honours_the_window(case: Case, runtime: offload_rt.Runtime,
                                           tmp_path: Path, window_field: dict[str, object]
                                           ) -> None:
    """params.json: mistral-inference's sliding_window (or _sliding_window, or one window per
    layer, all equal) gives the HF layout's logits, not full attention's."""
    model_dir = edited_copy(case.mistral_dir, tmp_path / "m", "params.json",
                            **{"sliding_window": None, **window_field})
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=CONTEXT) as rt:
        assert rt.config.sliding_window == WINDOW
        mistral = rt.model(torch.tensor(case.prompt), 0)
    assert max_diff(mistral, runtime.model(torch.tensor(case.prompt), 0)) <= 1e-6
    assert max_diff(mistral, case.ref_logits) <= ATOL


def test_a_21_token_prompt_runs_and_max_seq_len_512_is_capped_aloud(
        case: Case, caplog: pytest.LogCaptureFixture) -> None:
    """Was: context cut to the window (16), so 21 tokens were refused and --max-seq-len 512
    silently became 16. Now the context is max_position_embeddings (256)."""
    prompt = case.prompt[:21]
    with caplog.at_level(logging.WARNING, logger="offload_rt"):
        rt = offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=512)
    assert rt.max_seq_len == SPEC.max_position_embeddings
    assert "512" in caplog.text and str(SPEC.max_position_embeddings) in caplog.text
    out = rt.generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert out.token_ids == reference_greedy(case.hf_dir, prompt, 8)


def test_forward_from_zero_forgets_a_rolled_cache(case: Case,
                                                  runtime: offload_rt.Runtime) -> None:
    """A longer sequence first rolls the cache several times; a new one from 0 sees none of
    it."""
    other = (list(reversed(case.prompt)) * 2)[:CONTEXT]
    runtime.model(torch.tensor(other), 0)
    again = runtime.model(torch.tensor(case.prompt), 0)
    assert max_diff(again, case.ref_logits) <= ATOL


def test_kv_cache_holds_only_the_window(case: Case) -> None:
    """KV memory: W positions per layer for any longer context, counted by the budget (plus one
    layer's [W + chunk] keys and values while a chunk runs past a full window)."""
    cfg = offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=8).config
    kv_bytes = 2 * SPEC.num_kv_heads * SPEC.head_dim_resolved * 4  # one position, one layer
    with offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=256, prefill_chunk=32) as rt:
        assert rt.max_seq_len == 256
        assert rt.model.kv_cache_bytes == SPEC.num_layers * WINDOW * kv_bytes
        fp = rt.plan.footprint
    assert fp == footprint(cfg, torch.float32, 256, 32)
    assert (fp.kv_positions, fp.kv_window) == (WINDOW, WINDOW)
    assert fp.kv_cache == (SPEC.num_layers * WINDOW + WINDOW + 32) * kv_bytes
    short = footprint(cfg, torch.float32, 8, 32)  # a context inside the window: no rolling
    assert (short.kv_positions, short.kv_window) == (8, None)
    assert short.kv_cache == SPEC.num_layers * 8 * kv_bytes
    with pytest.raises(BudgetError, match="a rolling window of 16 positions"):
        offload_rt.load(case.hf_dir, dtype="float32", max_seq_len=256, cpu_memory=fp.fixed)
