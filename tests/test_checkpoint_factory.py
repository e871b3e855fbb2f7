"""Tiny checkpoints are faithful: deterministic, loadable, non-degenerate, both layouts agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
from checkpoint_factory import (
    HF_INDEX,
    TinySpec,
    build_model,
    corrupt_header,
    drop_tensor,
    hf_state_dict,
    load_reference_model,
    make_hf_checkpoint,
    make_mistral_checkpoint,
    mixtral_tokenizer_path,
    permute_hf_to_mistral,
    permute_mistral_to_hf,
    reference_greedy,
    reference_logits,
    remove_shard,
    reshape_tensor,
    truncate_file,
    write_legacy_rope_config,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

PROMPT = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(1)).tolist()


def read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def expected_mistral_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """Written out independently of the factory's renaming table."""
    h, d, i = spec.hidden_size, spec.head_dim_resolved, spec.intermediate_size
    shapes = {
        "tok_embeddings.weight": (spec.vocab_size, h),
        "norm.weight": (h,),
        "output.weight": (spec.vocab_size, h),
    }
    for n in range(spec.num_layers):
        p = f"layers.{n}."
        shapes[p + "attention.wq.weight"] = (spec.num_heads * d, h)
        shapes[p + "attention.wk.weight"] = (spec.num_kv_heads * d, h)
        shapes[p + "attention.wv.weight"] = (spec.num_kv_heads * d, h)
        shapes[p + "attention.wo.weight"] = (h, spec.num_heads * d)
        shapes[p + "attention_norm.weight"] = (h,)
        shapes[p + "ffn_norm.weight"] = (h,)
        shapes[p + "feed_forward.gate.weight"] = (spec.num_experts, h)
        for e in range(spec.num_experts):
            q = f"{p}feed_forward.experts.{e}."
            shapes[q + "w1.weight"] = shapes[q + "w3.weight"] = (i, h)
            shapes[q + "w2.weight"] = (h, i)
    return shapes


# --- determinism and the HF layout ---------------------------------------------------------------


@pytest.mark.parametrize("make", [make_hf_checkpoint, make_mistral_checkpoint])
def test_same_seed_gives_same_bytes(tmp_path: Path, make) -> None:
    a, b, c = (make(tmp_path / n, TinySpec(seed=s)) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    weights = [f for f in files if f.endswith(".safetensors")]
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in weights)


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(TinySpec())
    assert torch.equal(torch.rand(3), expected)


def test_hf_files_use_legacy_per_expert_names(tiny_hf_checkpoint: Path) -> None:
    saved = load_file(tiny_hf_checkpoint / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in saved
    assert "model.layers.0.block_sparse_moe.gate.weight" in saved
    mine = hf_state_dict(build_model(TinySpec()))  # our unfusing agrees with transformers'
    assert saved.keys() == mine.keys()
    assert all(torch.equal(saved[k], mine[k]) for k in saved)


def test_reference_logits_shape_and_spread(tiny_hf_checkpoint: Path) -> None:
    logits = reference_logits(tiny_hf_checkpoint, PROMPT)
    assert logits.shape == (32, 128) and logits.dtype == torch.float32
    assert logits.isfinite().all()
    assert logits.std(dim=-1).min() > 0.3  # not flat
    assert logits.argmax(dim=-1).unique().numel() >= 8  # the prediction depends on the token


def test_routing_varies_between_tokens(tiny_hf_checkpoint: Path) -> None:
    model = load_reference_model(tiny_hf_checkpoint)
    inputs: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    assert len(inputs) == 2
    for layer, h in zip(model.model.layers, inputs, strict=True):
        router_logits = h[0] @ layer.mlp.gate.weight.T  # [T, experts]
        chosen = router_logits.topk(2, dim=-1).indices.unique()
        assert chosen.numel() >= 3


def test_greedy_matches_step_by_step_argmax(tiny_hf_checkpoint: Path) -> None:
    ids = PROMPT[:6]
    generated = reference_greedy(tiny_hf_checkpoint, ids, 5)
    assert len(generated) == 5
    for token in generated:
        assert reference_logits(tiny_hf_checkpoint, ids)[-1].argmax().item() == token
        ids = ids + [token]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files(tmp_path: Path, tiny_hf_checkpoint: Path, dtype) -> None:
    spec = TinySpec(dtype=dtype)
    hf = make_hf_checkpoint(tmp_path / "hf", spec)
    mistral = make_mistral_checkpoint(tmp_path / "mistral", spec)
    for model_dir in (hf, mistral):
        assert {t.dtype for t in read_all(model_dir).values()} == {dtype}
    assert json.loads((hf / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    logits = reference_logits(hf, PROMPT)  # upcast to fp32: close to, not equal to, fp32 weights
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, reference_logits(tiny_hf_checkpoint, PROMPT), atol=0.5)


def test_hf_shards_and_index(tmp_path: Path, tiny_hf_checkpoint: Path) -> None:
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(shards=3))
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((model_dir / HF_INDEX).read_text())
    tensors = read_all(model_dir)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for name, shard in index["weight_map"].items():
        with safe_open(model_dir / shard, "pt") as f:
            names = f.keys()
        assert name in names
    expected = reference_logits(tiny_hf_checkpoint, PROMPT)
    assert torch.equal(reference_logits(model_dir, PROMPT), expected)


def test_legacy_rope_config_loads_the_same(tmp_path: Path) -> None:
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(rope_theta=10.0))
    new_style = reference_logits(model_dir, PROMPT)
    write_legacy_rope_config(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["rope_theta"] == 10.0 and "rope_parameters" not in cfg
    assert cfg["torch_dtype"] == "float32" and "dtype" not in cfg and "head_dim" not in cfg
    assert torch.equal(reference_logits(model_dir, PROMPT), new_style)
    other = make_hf_checkpoint(tmp_path / "theta1e6", TinySpec())
    assert not torch.allclose(reference_logits(other, PROMPT), new_style)  # theta is read


def test_head_dim_other_than_hidden_over_heads(tmp_path: Path, tiny_hf_checkpoint: Path) -> None:
    default_cfg = json.loads((tiny_hf_checkpoint / "config.json").read_text())
    assert default_cfg["head_dim"] is None  # as transformers 5.x writes an unset head_dim
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(head_dim=16))
    assert json.loads((model_dir / "config.json").read_text())["head_dim"] == 16
    assert read_all(model_dir)["model.layers.0.self_attn.q_proj.weight"].shape == (64, 32)
    assert reference_logits(model_dir, PROMPT).shape == (32, 128)


def test_tokenizer_is_copied(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        TinySpec(tokenizer=True)
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(tokenizer=True, vocab_size=32000))
    assert (model_dir / "tokenizer.model").read_bytes() == mixtral_tokenizer_path().read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert sp.vocab_size() == 32000


# --- the Mistral-native layout -------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TinySpec(), TinySpec(head_dim=16, shards=3)])
def test_mistral_names_shapes_and_params(tmp_path: Path, spec: TinySpec) -> None:
    model_dir = make_mistral_checkpoint(tmp_path, spec)
    tensors = read_all(model_dir)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_mistral_shapes(spec)
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if spec.shards == 1:
        assert files == ["consolidated.safetensors"]
    else:
        assert files == [f"consolidated.0{i}.safetensors" for i in range(spec.shards)]
    params = json.loads((model_dir / "params.json").read_text())
    assert params["head_dim"] == spec.head_dim_resolved
    assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    assert (params["dim"], params["n_layers"], params["hidden_dim"]) == (32, 2, 48)
    assert (params["n_heads"], params["n_kv_heads"], params["vocab_size"]) == (4, 2, 128)
    assert (params["rope_theta"], params["norm_eps"]) == (1e6, 1e-5)


def test_layouts_hold_the_same_weights(
    tiny_hf_checkpoint: Path, tiny_mistral_checkpoint: Path
) -> None:
    hf, mi = read_all(tiny_hf_checkpoint), read_all(tiny_mistral_checkpoint)
    assert torch.equal(mi["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(mi["output.weight"], hf["lm_head.weight"])
    att = "model.layers.1.self_attn."
    wq = permute_mistral_to_hf(mi["layers.1.attention.wq.weight"], 4)
    assert torch.equal(wq, hf[att + "q_proj.weight"])
    wk = permute_mistral_to_hf(mi["layers.1.attention.wk.weight"], 2)
    assert torch.equal(wk, hf[att + "k_proj.weight"])
    assert torch.equal(mi["layers.1.attention.wv.weight"], hf[att + "v_proj.weight"])
    expert = "block_sparse_moe.experts.2.w3.weight"
    assert torch.equal(
        mi["layers.0.feed_forward.experts.2.w3.weight"], hf[f"model.layers.0.{expert}"]
    )


@pytest.mark.parametrize(("n_heads", "head_dim"), [(4, 8), (2, 16), (1, 2)])
def test_permutations_are_inverse(n_heads: int, head_dim: int) -> None:
    w = torch.randn(n_heads * head_dim, 5)
    assert torch.equal(permute_hf_to_mistral(permute_mistral_to_hf(w, n_heads), n_heads), w)
    assert torch.equal(permute_mistral_to_hf(permute_hf_to_mistral(w, n_heads), n_heads), w)
    if head_dim > 2:
        assert not torch.equal(permute_mistral_to_hf(w, n_heads), w)


# --- RoPE: Mistral's interleaved complex pairs == HF's rotate_half after the permutation ----------


def rope_mistral(x: torch.Tensor, theta: float) -> torch.Tensor:
    """As mistral-inference: consecutive pairs (2i, 2i+1) are complex numbers. x: [T, H, D]."""
    t, _, d = x.shape
    freqs = torch.outer(torch.arange(t).float(), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)  # [T, D/2]
    x_c = torch.view_as_complex(x.float().reshape(t, -1, d // 2, 2))
    return torch.view_as_real(x_c * freqs_cis[:, None, :]).flatten(2)


def rope_hf(x: torch.Tensor, theta: float) -> torch.Tensor:
    """As transformers: dims i and i + D/2 form a pair (rotate_half). x: [T, H, D]."""
    t, _, d = x.shape
    freqs = torch.outer(torch.arange(t).float(), 1.0 / theta ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


@pytest.mark.parametrize("head_dim", [None, 16])
def test_mistral_rope_matches_hf_rope(tmp_path: Path, head_dim: int | None) -> None:
    spec = TinySpec(head_dim=head_dim, rope_theta=100.0)
    hf = read_all(make_hf_checkpoint(tmp_path / "hf", spec))
    mi = read_all(make_mistral_checkpoint(tmp_path / "mistral", spec))
    x = torch.randn(16, spec.hidden_size, generator=torch.Generator().manual_seed(2))  # [T, hidden]
    d = spec.head_dim_resolved
    for hf_name, mi_name, heads in (("q_proj", "wq", 4), ("k_proj", "wk", 2)):
        w_hf = hf[f"model.layers.0.self_attn.{hf_name}.weight"]
        w_mi = mi[f"layers.0.attention.{mi_name}.weight"]
        want = rope_hf((x @ w_hf.T).view(16, heads, d), spec.rope_theta)
        got = rope_mistral((x @ w_mi.T).view(16, heads, d), spec.rope_theta)  # interleaved
        got = permute_mistral_to_hf(got.reshape(16, heads * d).T, heads).T.view(16, heads, d)
        torch.testing.assert_close(got, want)
        wrong = rope_hf((x @ w_mi.T).view(16, heads, d), spec.rope_theta)  # layout mix-up
        wrong = permute_mistral_to_hf(wrong.reshape(16, -1).T, heads).T.view(16, heads, d)
        assert not torch.allclose(wrong, want)


# --- corruption helpers --------------------------------------------------------------------------


def test_truncate_and_corrupt_header(tmp_path: Path, tiny_hf_checkpoint: Path) -> None:
    for breaker in (lambda p: truncate_file(p, 100), corrupt_header):
        model_dir = shutil.copytree(tiny_hf_checkpoint, tmp_path / breaker.__name__)
        path = model_dir / "model.safetensors"
        size = path.stat().st_size
        breaker(path)
        assert path.stat().st_size in (100, size)
        with pytest.raises(SafetensorError):
            safe_open(path, "pt")


def test_drop_reshape_and_remove_shard(tmp_path: Path) -> None:
    model_dir = make_hf_checkpoint(tmp_path, TinySpec(shards=2))
    index_path = model_dir / HF_INDEX
    gone, bent, kept = (
        "model.layers.0.block_sparse_moe.experts.1.w2.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
    )
    drop_tensor(model_dir, gone)
    reshape_tensor(model_dir, bent, (32, 16))
    drop_tensor(model_dir, kept, keep_index_entry=True)
    tensors = read_all(model_dir)
    index = json.loads(index_path.read_text())
    assert gone not in tensors and gone not in index["weight_map"]
    assert kept not in tensors and kept in index["weight_map"]
    assert tensors[bent].shape == (32, 16)
    shard = index["weight_map"][bent]
    remove_shard(model_dir, shard)
    assert not (model_dir / shard).exists()
    assert shard in json.loads(index_path.read_text())["weight_map"].values()


def test_corruption_helpers_work_on_mistral_layout(tmp_path: Path) -> None:
    model_dir = make_mistral_checkpoint(tmp_path, TinySpec())
    drop_tensor(model_dir, "layers.1.ffn_norm.weight")
    reshape_tensor(model_dir, "norm.weight", (33,))
    tensors = read_all(model_dir)
    assert "layers.1.ffn_norm.weight" not in tensors
    assert tensors["norm.weight"].shape == (33,)
