"""The shipped demo model (offload_rt/demo_model): shape, size, tokenizer, and exactness.

The checkpoint is trained by training/train_demo.py. These tests check what a fresh user
relies on: it is a real Mixtral-layout MoE (>= 8 experts, top-2, >= 4 layers) within 20 MB,
its tokenizer spells any text, and offload_rt generates the same greedy tokens as
transformers' reference MixtralForCausalLM (also when experts are offloaded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import offload_rt
from offload_rt.tokenizer import Tokenizer

# OFFLOAD_RT_DEMO_MODEL: check a freshly trained folder before it replaces the shipped one.
DEMO = Path(os.environ.get("OFFLOAD_RT_DEMO_MODEL")
            or Path(offload_rt.__file__).resolve().parent / "demo_model")
PROMPT = "Once upon a time"
NEW_TOKENS = 16
MAX_BYTES = 20 * 1024 * 1024

ENGLISH = [
    "Once upon a time, a hacker wrote a program that printed its own source code.",
    "The Python interpreter reads a file, compiles it to bytecode, and runs it.",
    "  Leading spaces,\ttabs and\nnew lines\n\nsurvive the round trip.  ",
    "Numbers like 3.14159 and 2026 are split into digits.",
]
UNUSUAL = ["naïve café — “quotes” ☃ 日本語 🙂", "\x00\x7f byte soup ÿ"]


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


def test_folder_has_the_hugging_face_files() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.model", "MODEL_CARD.md"):
        assert (DEMO / name).is_file(), name


def test_folder_is_small_enough() -> None:
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"demo model folder is {size / 2**20:.1f} MiB"


def test_config_is_a_real_moe(config: dict) -> None:
    assert config["model_type"] == "mixtral"
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] >= 8
    assert config["num_experts_per_tok"] == 2
    assert config["num_hidden_layers"] >= 4
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_weights_use_standard_per_expert_names_in_half_precision(config: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(DEMO / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    assert dtypes <= {"BF16", "F16"}, dtypes
    for layer in range(config["num_hidden_layers"]):
        moe = f"model.layers.{layer}.block_sparse_moe"
        assert f"{moe}.gate.weight" in names
        for e in range(config["num_local_experts"]):
            for w in ("w1", "w2", "w3"):
                assert f"{moe}.experts.{e}.{w}.weight" in names
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names


def test_tokenizer_ids_and_round_trip(config: dict) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == config["vocab_size"]
    tok = Tokenizer.from_model_dir(DEMO)
    for text in ENGLISH + UNUSUAL:
        ids = tok.encode(text, bos=False)
        assert 0 not in ids, f"unk in {text!r}"  # byte fallback spells anything
        assert tok.decode(ids) == text
    # English is mostly whole-word pieces, not bytes.
    ids = tok.encode(ENGLISH[0], bos=False)
    assert len(ids) < len(ENGLISH[0]) / 2.5


def test_chat_template_accepts_the_tokenizer() -> None:
    from offload_rt.chat_template import encode_chat

    tok = Tokenizer.from_model_dir(DEMO)
    ids = encode_chat(tok, [{"role": "user", "content": "What does 'hack' mean?"}])
    assert ids[0] == 1
    assert tok.decode(ids) == "[INST] What does 'hack' mean? [/INST]"


@pytest.fixture(scope="module")
def reference_tokens() -> list[int]:
    """transformers' greedy continuation of PROMPT in float32, EOS disabled."""
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.MixtralForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    tok = Tokenizer.from_model_dir(DEMO)
    ids = torch.tensor([tok.encode(PROMPT, bos=True)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_tokens_match_transformers(reference_tokens: list[int]) -> None:
    rt = offload_rt.load(str(DEMO), dtype="float32")
    out = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(reference_tokens) == NEW_TOKENS
    assert out.token_ids == reference_tokens


def test_greedy_tokens_match_transformers_with_offloaded_experts(
        reference_tokens: list[int], config: dict) -> None:
    rt = offload_rt.load(str(DEMO), dtype="float32", cache_experts=config["num_experts_per_tok"] + 1,
                         policy="lru")
    out = rt.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.stats["offloaded"]
    assert out.token_ids == reference_tokens



BALANCE_PROMPTS = ("Once upon a time", "The Python interpreter", "A hacker is",
                   "Fortune cookies say")


def test_every_layer_spreads_its_picks_over_its_experts(config: dict) -> None:
    """No layer's router may favour a few experts: on text of the model's own kind (its sampled
    continuations of four prompts, ~800 tokens) each expert gets between half and twice its
    uniform share of the top-k picks in every layer. The first release, trained with a pooled
    auxiliary loss, gave one expert 36-50% of the picks and others none in layers 1-5, which
    made every cache look better than on a real MoE."""
    import torch

    experts = config["num_local_experts"]
    counts = torch.zeros(config["num_hidden_layers"], experts)
    with offload_rt.load(str(DEMO), dtype="float32", offload=False, max_seq_len=512) as rt:
        ids: list[int] = []
        for prompt in BALANCE_PROMPTS:
            out = rt.generate(prompt, max_new_tokens=200, temperature=0.8, seed=0,
                              ignore_eos=True)
            ids += out.prompt_token_ids + out.token_ids
        original = rt.experts.on_route

        def on_route(layer: int, probs: torch.Tensor, top: torch.Tensor) -> None:
            counts[layer] += torch.bincount(top.flatten(), minlength=experts)
            original(layer, probs, top)

        rt.experts.on_route = on_route
        for start in range(0, len(ids), 400):  # each forward starts a new context
            rt.model(torch.tensor(ids[start:start + 400]), 0)
    assert counts.sum(dim=1).min() >= 1500  # enough picks per layer to judge
    share = counts / counts.sum(dim=1, keepdim=True)  # [layers, experts]
    uniform = 1 / experts
    for layer, row in enumerate(share.tolist()):
        assert min(row) >= uniform / 2 and max(row) <= 2 * uniform, (layer, row)
