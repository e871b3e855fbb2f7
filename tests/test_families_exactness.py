"""Every family equals transformers' own class, the oracle, on tiny random checkpoints.

Qwen2-MoE (q/k/v biases, a shared expert with its sigmoid gate, norm_topk_prob off and on),
Qwen3-MoE (q/k RMSNorm per head, a head_dim unrelated to hidden/heads, 128 and 64 experts
top-8, a sliding window over every layer) and OLMoE (q/k RMSNorm over the whole projection,
clip_qkv, no top-k renormalization; 64 experts top-8), each written by transformers'
``save_pretrained``: in float32 the logits of a 32-token prompt match the oracle's to 1e-5 and
32 greedy tokens are the oracle's; a bf16 file in bf16 compute stays near it; the prompt run
in chunks gives the unchunked logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_factory import (
    FamilySpec,
    make_family_checkpoint,
    reference_greedy,
    reference_logits,
)

import offload_rt

PROMPT_LEN = 32
NEW_TOKENS = 32
MAX_SEQ_LEN = PROMPT_LEN + NEW_TOKENS
FP32_ATOL = 1e-5
BF16_ATOL = 0.1

SPECS = {
    "qwen2_moe-e8top2-shared": FamilySpec("qwen2_moe", seed=21),
    "qwen2_moe-e16top4-norm-kv1-bf16": FamilySpec(
        "qwen2_moe", num_experts=16, top_k=4, norm_topk_prob=True, num_kv_heads=1,
        shared_expert_size=56, dtype=torch.bfloat16, seed=22),
    "qwen3_moe-e128top8-hd16-norm": FamilySpec(
        "qwen3_moe", num_experts=128, top_k=8, head_dim=16, norm_topk_prob=True, seed=23),
    "qwen3_moe-e64top8-window8": FamilySpec(
        "qwen3_moe", num_experts=64, top_k=8, sliding_window=8, seed=24),
    "olmoe-e64top8-clip": FamilySpec(
        "olmoe", num_experts=64, top_k=8, clip_qkv=0.5, rms_norm_eps=1e-5, seed=25),
    "olmoe-e16top2-norm-h8": FamilySpec(
        "olmoe", num_experts=16, top_k=2, num_heads=8, num_kv_heads=8, norm_topk_prob=True,
        seed=26),
}


@dataclass(frozen=True)
class Case:
    spec: FamilySpec
    model_dir: Path
    prompt: list[int]
    ref_logits: torch.Tensor  # [T, V] float32
    ref_greedy: list[int]


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    spec = SPECS[request.param]
    model_dir = make_family_checkpoint(tmp_path_factory.mktemp(spec.family), spec)
    gen = torch.Generator().manual_seed(spec.seed + 100)
    prompt = torch.randint(1, spec.vocab_size, (PROMPT_LEN,), generator=gen).tolist()
    return Case(spec, model_dir, prompt, reference_logits(model_dir, prompt),
                reference_greedy(model_dir, prompt, NEW_TOKENS))


@pytest.fixture(scope="module")
def runtime(case: Case) -> offload_rt.Runtime:
    return offload_rt.load(case.model_dir, dtype="float32", max_seq_len=MAX_SEQ_LEN)


def test_the_case_is_not_degenerate(case: Case, runtime: offload_rt.Runtime,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Varied logits, and the prompt spreads over the experts (at 128 experts top-8, 32 tokens
    make 256 picks per layer: most experts, not a few)."""
    assert runtime.config.family == case.spec.family
    assert case.ref_logits.std(dim=-1).min() > 0.1
    assert len(set(case.ref_logits.argmax(-1).tolist())) > 1
    used: set[tuple[int, int]] = set()

    def record(layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        used.update((layer, e) for e in ids.flatten().tolist())

    monkeypatch.setattr(runtime.experts, "on_route", record)
    runtime.model(torch.tensor(case.prompt), 0)
    spec = case.spec
    assert len(used) >= spec.num_layers * min(spec.num_experts, PROMPT_LEN * spec.top_k) // 2


def test_fp32_logits_match_transformers(case: Case, runtime: offload_rt.Runtime) -> None:
    ours = runtime.model(torch.tensor(case.prompt), 0)
    assert ours.shape == case.ref_logits.shape
    assert (ours - case.ref_logits).abs().max().item() < FP32_ATOL


def test_greedy_tokens_match_transformers(case: Case, runtime: offload_rt.Runtime) -> None:
    out = runtime.generate(case.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == case.ref_greedy


def test_chunked_prefill_gives_the_same_logits(case: Case, runtime: offload_rt.Runtime) -> None:
    whole = runtime.model(torch.tensor(case.prompt), 0)
    parts = [runtime.model(torch.tensor(case.prompt[i:i + 8]), i)
             for i in range(0, PROMPT_LEN, 8)]
    assert (torch.cat(parts) - whole).abs().max().item() < FP32_ATOL


def test_bf16_files_compute_near_the_oracle(case: Case) -> None:
    """bf16 compute is as far from the float32 oracle as transformers' own bf16 run is (the
    biases and the shared expert make these logits larger than Mixtral's: 0.33 off there)."""
    if case.spec.dtype != torch.bfloat16:
        pytest.skip("float32 file")
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        case.model_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.inference_mode():
        oracle_bf16 = oracle(torch.tensor([case.prompt])).logits[0].float()
    with offload_rt.load(case.model_dir, max_seq_len=MAX_SEQ_LEN) as rt:
        assert rt.dtype == torch.bfloat16
        ours = rt.model(torch.tensor(case.prompt), 0)
    oracle_error = (oracle_bf16 - case.ref_logits).abs().max().item()
    assert (ours - case.ref_logits).abs().max().item() <= max(BF16_ATOL, 1.5 * oracle_error)
