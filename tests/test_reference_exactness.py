"""Our Mixtral equals transformers' MixtralForCausalLM, the oracle, on tiny random checkpoints.

Each spec below varies what a port gets wrong: depth, grouped-query heads (including one KV head),
a head_dim unrelated to hidden/heads, odd sizes, 4 or 8 experts with top-1 or top-2 routing, both
RoPE bases, bf16 or fp32 files, one file or three shards. For each, in fp32 compute, the logits of
a 32-token prompt match the oracle's to 1e-5 and 32 greedy tokens are the oracle's; the same
weights in the Mistral-native layout, a transformers-4.x config.json and chunked prefill/decode
all give the same logits. Checkpoints and oracle outputs are built once per module.
"""

from __future__ import annotations

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
    write_legacy_rope_config,
)

import offload_rt

PROMPT_LEN = 32
NEW_TOKENS = 32
MAX_SEQ_LEN = PROMPT_LEN + NEW_TOKENS  # generation fills the KV cache exactly
FP32_ATOL = 1e-5
BF16_ATOL = 0.1  # bf16 compute vs the fp32 oracle: ~0.03 observed on these specs

SPECS = {
    "L1-h4kv4-e4top1-theta1e4-fp32": TinySpec(
        num_layers=1, num_heads=4, num_kv_heads=4, num_experts=4, top_k=1, rope_theta=1e4, seed=1
    ),
    "L2-h4kv2-e8top2-fp32-3shards": TinySpec(
        num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, shards=3, seed=2
    ),
    "L3-h8kv1-hd8-odd-e4top2-bf16": TinySpec(
        num_layers=3, hidden_size=40, intermediate_size=72, vocab_size=131, num_heads=8,
        num_kv_heads=1, head_dim=8, num_experts=4, top_k=2, dtype=torch.bfloat16, seed=6,
    ),
    "L2-hd16-e8top1-theta1e4-bf16-3shards": TinySpec(
        num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8,
        top_k=1, rope_theta=1e4, dtype=torch.bfloat16, shards=3, seed=4,
    ),
    "L3-h4kv4-hd10-odd-e8top2-fp32": TinySpec(
        num_layers=3, hidden_size=40, intermediate_size=72, vocab_size=131, num_heads=4,
        num_kv_heads=4, num_experts=8, top_k=2, seed=5,
    ),
}
BF16_SPECS = [name for name, spec in SPECS.items() if spec.dtype == torch.bfloat16]


def random_prompt(spec: TinySpec) -> list[int]:
    """No token 0: reference_greedy passes pad_token_id=0, and transformers' generate then masks
    every 0 in the prompt out of attention as padding (a wrong oracle, not a wrong model)."""
    gen = torch.Generator().manual_seed(spec.seed + 100)
    return torch.randint(1, spec.vocab_size, (PROMPT_LEN,), generator=gen).tolist()


def load_fp32(model_dir: Path, **options: object) -> offload_rt.Runtime:
    return offload_rt.load(model_dir, dtype="float32", max_seq_len=MAX_SEQ_LEN, **options)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@dataclass(frozen=True)
class Case:
    """One spec on disk in both layouts, with the oracle's answers for its prompt."""

    spec: TinySpec
    hf_dir: Path
    mistral_dir: Path
    prompt: list[int]
    ref_logits: torch.Tensor  # [T, V] float32
    ref_greedy: list[int]


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    spec = SPECS[request.param]
    hf_dir = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), spec)
    mistral_dir = make_mistral_checkpoint(tmp_path_factory.mktemp("mistral"), spec)
    prompt = random_prompt(spec)
    return Case(spec, hf_dir, mistral_dir, prompt, reference_logits(hf_dir, prompt),
                reference_greedy(hf_dir, prompt, NEW_TOKENS))


@pytest.fixture(scope="module")
def runtime(case: Case) -> offload_rt.Runtime:
    """Shared by the tests of one case: each forward starts at position 0, so none leaks state."""
    return load_fp32(case.hf_dir)


def test_the_case_is_not_degenerate(case: Case, runtime: offload_rt.Runtime,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat logits or an expert no token uses would let a wrong model still match the oracle."""
    assert case.ref_logits.std(dim=-1).min() > 0.1
    assert len(set(case.ref_logits.argmax(-1).tolist())) > 1
    used: set[tuple[int, int]] = set()

    def record(layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        used.update((layer, e) for e in ids.flatten().tolist())

    monkeypatch.setattr(runtime.experts, "on_route", record)
    runtime.model(torch.tensor(case.prompt), 0)
    spec = case.spec
    assert used == {(i, e) for i in range(spec.num_layers) for e in range(spec.num_experts)}


def test_fp32_logits_match_transformers(case: Case, runtime: offload_rt.Runtime) -> None:
    assert runtime.dtype == torch.float32
    ours = runtime.model(torch.tensor(case.prompt), 0)
    assert ours.dtype == torch.float32
    assert max_diff(ours, case.ref_logits) <= FP32_ATOL


def test_greedy_tokens_match_transformers(case: Case, runtime: offload_rt.Runtime) -> None:
    out = runtime.generate(case.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.prompt_token_ids == case.prompt
    assert out.token_ids == case.ref_greedy
    assert out.finish_reason == "length"


def test_chunked_prefill_in_generate_gives_the_same_tokens(case: Case) -> None:
    """prefill_chunk=7 splits the 32-token prompt 7+7+7+7+4 inside generate."""
    out = load_fp32(case.hf_dir, prefill_chunk=7).generate(
        case.prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True
    )
    assert out.token_ids == case.ref_greedy


def test_mistral_layout_gives_the_same_logits(case: Case, runtime: offload_rt.Runtime) -> None:
    hf = runtime.model(torch.tensor(case.prompt), 0)
    mistral_rt = load_fp32(case.mistral_dir)
    assert mistral_rt.checkpoint.layout == "mistral"
    mistral = mistral_rt.model(torch.tensor(case.prompt), 0)
    assert max_diff(mistral, hf) <= 1e-6
    assert max_diff(mistral, case.ref_logits) <= FP32_ATOL


def test_legacy_config_json_gives_the_same_logits(
    case: Case, runtime: offload_rt.Runtime, tmp_path: Path
) -> None:
    """transformers 4.x writes top-level rope_theta and omits head_dim when it is derived."""
    legacy_dir = Path(shutil.copytree(case.hf_dir, tmp_path / "legacy"))
    write_legacy_rope_config(legacy_dir)
    legacy_rt = load_fp32(legacy_dir)
    assert legacy_rt.config == runtime.config
    legacy = legacy_rt.model(torch.tensor(case.prompt), 0)
    assert torch.equal(legacy, runtime.model(torch.tensor(case.prompt), 0))


def test_chunked_decode_matches_one_shot_forward(case: Case, runtime: offload_rt.Runtime) -> None:
    """Prompt fed 10 + 10 tokens, then one at a time, against the KV cache."""
    ids = torch.tensor(case.prompt)
    one_shot = runtime.model(ids, 0)
    pieces = [runtime.model(ids[:10], 0), runtime.model(ids[10:20], 10)]
    pieces += [runtime.model(ids[pos:pos + 1], pos) for pos in range(20, PROMPT_LEN)]
    chunked = torch.cat(pieces)
    assert max_diff(chunked, one_shot) <= FP32_ATOL
    assert max_diff(chunked, case.ref_logits) <= FP32_ATOL


def test_forward_restarted_at_position_zero_forgets_the_previous_sequence(
    case: Case, runtime: offload_rt.Runtime
) -> None:
    """A longer sequence first fills the cache; a new one from 0 must not see its leftovers."""
    other = list(reversed(case.prompt)) * 2
    runtime.model(torch.tensor(other), 0)
    again = runtime.model(torch.tensor(case.prompt), 0)
    assert max_diff(again, case.ref_logits) <= FP32_ATOL


# --- bf16 compute -------------------------------------------------------------------------------
#
# bf16 rounding may flip a routing decision the fp32 model makes by a hair (two router logits
# 0.01 apart can round to a tie), and then that token's logits move by ~1, legitimately. So the
# bf16 checks run up to the first flipped decision, and require that flip to be such a near-tie.


def routing(
    rt: offload_rt.Runtime, ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``ids`` from position 0; returns the logits [T, V] and, per layer and position, the
    chosen experts (sorted) [L, T, K] and the router-logit gap between the k-th and the
    (k+1)-th choice [L, T]."""
    chosen, gaps = [], []

    def record(layer: int, probs: torch.Tensor, top_ids: torch.Tensor) -> None:
        k = top_ids.shape[1]
        ranked = probs.log().sort(dim=-1, descending=True).values  # [T, E]
        chosen.append(top_ids.sort(dim=-1).values)
        gaps.append(ranked[:, k - 1] - ranked[:, k])

    rt.experts.on_route = record  # type: ignore[method-assign]  # a local runtime: no undo
    logits = rt.model(torch.tensor(ids), 0)
    return logits, torch.stack(chosen), torch.stack(gaps)


NEAR_TIE = 0.1  # router-logit gap bf16 rounding may flip (observed flip: gap 0.013)


@pytest.mark.parametrize("name", BF16_SPECS)
def test_bf16_compute_stays_close_to_the_fp32_oracle(name: str, tmp_path: Path) -> None:
    """The default dtype of a bf16 checkpoint is bf16. Scored on the oracle's greedy path (prompt
    + its 32 tokens), up to the first routing decision bf16 changes (which must be a near-tie in
    fp32): logits are within BF16_ATOL of the oracle, and every next-token choice whose oracle
    margin (top-1 minus top-2 logit) exceeds 2 * BF16_ATOL is the oracle's."""
    spec = SPECS[name]
    model_dir = make_hf_checkpoint(tmp_path / "bf16", spec)
    prompt = random_prompt(spec)
    seq = prompt + reference_greedy(model_dir, prompt, NEW_TOKENS)
    bf16_rt = offload_rt.load(model_dir, max_seq_len=MAX_SEQ_LEN)
    assert bf16_rt.dtype == torch.bfloat16

    ours, bf16_chosen, _ = routing(bf16_rt, seq)
    _, fp32_chosen, fp32_gaps = routing(load_fp32(model_dir), seq)
    assert ours.dtype == torch.float32 and ours.isfinite().all()
    changed = (bf16_chosen != fp32_chosen).any(dim=-1).nonzero().tolist()  # [[layer, pos], ...]
    n = min((pos for _, pos in changed), default=len(seq))
    if changed:
        root_layer = min(layer for layer, pos in changed if pos == n)
        assert fp32_gaps[root_layer, n] < NEAR_TIE
    ref = reference_logits(model_dir, seq)[:n]
    assert max_diff(ours[:n], ref) <= BF16_ATOL
    top2 = ref.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * BF16_ATOL
    assert clear.sum() >= 5, "too few clear-cut positions to test: pick another seed"
    assert torch.equal(ours[:n].argmax(-1)[clear], ref.argmax(-1)[clear])


@pytest.mark.parametrize("name", BF16_SPECS)
def test_bf16_generate_runs_and_starts_from_its_own_prefill(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]
    model_dir = make_hf_checkpoint(tmp_path / "bf16", spec)
    prompt = random_prompt(spec)
    rt = offload_rt.load(model_dir, max_seq_len=MAX_SEQ_LEN)
    first = rt.model(torch.tensor(prompt), 0)[-1].argmax().item()
    out = rt.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.finish_reason == "length" and len(out.token_ids) == NEW_TOKENS
    assert all(0 <= t < spec.vocab_size for t in out.token_ids)
    assert out.token_ids[0] == first  # prefill is the same computation as the one-shot forward
