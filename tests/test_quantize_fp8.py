"""``offload-rt quantize --experts fp8``: a compressed-tensors checkpoint (F8_E4M3 expert
weights, a float32 scale per output channel) that the fp8 reader runs.

Checked: the scheme (absmax / 448 per row, as compressed-tensors computes it, recomputed here
independently), the config the existing reader accepts, the folder running as the float
folder of its dequantized weights (to 1e-5 in float32) and close to the source, offloaded ==
resident bit for bit, another family, and the refusals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import (
    FamilySpec,
    TinySpec,
    make_family_checkpoint,
    make_hf_checkpoint,
    read_safetensors,
)
from safetensors.torch import save_file
from test_engine_exactness import run_sequence

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import CheckpointError, OptionError
from offload_rt.quant.fp8 import Fp8Format
from offload_rt.quant.fp8_scheme import read_fp8_scheme
from offload_rt.quant.quantize import QuantizeSettings, quantize

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, vocab_size=256, seed=47)
PROMPT = list(range(3, 33))
FEED = [5, 9, 3, 7]
W1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(float source, its fp8 folder)."""
    root = tmp_path_factory.mktemp("fp8")
    source = make_hf_checkpoint(root / "float", SPEC)
    quantize(source, root / "fp8", QuantizeSettings("fp8"))
    return source, root / "fp8"


def _logits(model_dir: Path, **options: Any) -> list[torch.Tensor]:
    with offload_rt.load(model_dir, dtype="float32", max_seq_len=64, **options) as rt:
        return run_sequence(rt, PROMPT, FEED)


def test_weights_are_absmax_over_448_per_channel(folders: tuple[Path, Path]) -> None:
    source, fp8 = folders
    _, want = read_safetensors(source / "model.safetensors")
    _, got = read_safetensors(fp8 / "model-00001-of-00001.safetensors")
    w = want[W1].float()
    scale = got[W1.removesuffix("weight") + "weight_scale"]
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], 1)
    assert torch.equal(scale, w.abs().amax(dim=1, keepdim=True) / 448)
    q = got[W1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert torch.equal(q, (w / scale).to(torch.float8_e4m3fn))
    assert q.float().abs().amax(dim=1).eq(448).all()  # each row's largest weight -> 448
    error = (q.float() * scale - w).abs().max() / w.abs().max()
    assert 0 < error.item() <= 2**-4  # e4m3: 3 mantissa bits, half an ulp
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight",
                 "model.layers.0.block_sparse_moe.gate.weight"):  # the trunk as stored
        assert torch.equal(got[name], want[name])


def test_config_is_what_the_fp8_reader_accepts(folders: tuple[Path, Path]) -> None:
    path = folders[1] / "config.json"
    quant = json.loads(path.read_text())["quantization_config"]
    scheme = read_fp8_scheme(quant, path)
    assert (scheme.method, scheme.strategy, scheme.block) == ("compressed-tensors", "channel",
                                                              None)
    assert "lm_head" in quant["ignore"] and "model.layers.1.self_attn.o_proj" in quant["ignore"]
    assert "model.layers.0.block_sparse_moe.gate" in quant["ignore"]
    assert not any("experts" in name for name in quant["ignore"])


def test_runs_as_its_dequantized_model(folders: tuple[Path, Path], tmp_path: Path) -> None:
    """Against a float32 folder holding float32(q) * scale for every expert matrix."""
    source, fp8 = folders
    metadata, tensors = read_safetensors(fp8 / "model-00001-of-00001.safetensors")
    dequantized = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        scale = tensors.get(name.removesuffix("weight") + "weight_scale")
        dequantized[name] = t.float() * scale if scale is not None else t
    (tmp_path / "ref").mkdir()
    save_file(dequantized, tmp_path / "ref" / "model.safetensors", metadata)
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "ref" / "config.json").write_text(json.dumps(config))
    with offload_rt.load(fp8, dtype="float32", offload=False) as rt:
        assert isinstance(rt.expert_format, Fp8Format)
    got = _logits(fp8, offload=False)
    for g, w in zip(got, _logits(tmp_path / "ref", offload=False), strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=0)
    ref, ours = torch.cat(_logits(source, offload=False)), torch.cat(got)
    assert 0 < ((ours - ref).norm() / ref.norm()).item() < 0.05


def test_offloaded_equals_resident(folders: tuple[Path, Path]) -> None:
    resident = _logits(folders[1], offload=False)
    offloaded = _logits(folders[1], cache_experts=SPEC.top_k, prefetch=1)
    for g, w in zip(offloaded, resident, strict=True):
        assert torch.equal(g, w)


def test_another_family(tmp_path: Path) -> None:
    """qwen2_moe: its expert names, a float shared expert and q/k/v biases."""
    spec = FamilySpec("qwen2_moe", seed=33)
    source = make_family_checkpoint(tmp_path / "float", spec)
    quantize(source, tmp_path / "fp8", QuantizeSettings("fp8"))
    quant = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.shared_expert.up_proj" in quant["ignore"]
    with offload_rt.load(tmp_path / "fp8", dtype="float32", offload=False) as rt:
        assert rt.expert_format.name == "fp8"
        want = run_sequence(rt, PROMPT, FEED)
    with offload_rt.load(tmp_path / "fp8", dtype="float32", cache_experts=spec.top_k) as rt:
        assert all(torch.equal(g, w) for g, w in zip(run_sequence(rt, PROMPT, FEED), want,
                                                      strict=True))


@pytest.mark.parametrize(("settings", "expected"), [
    ({"group_size": 64}, "--group-size 64 does not apply to --experts fp8"),
    ({"scale_dtype": "float16"}, "--scale-dtype float16 does not apply to --experts fp8"),
    ({"trunk": "int8"}, "--trunk int8 with --experts fp8: an fp8 folder is a compressed"),
])
def test_refusals_name_the_flag(folders: tuple[Path, Path], tmp_path: Path,
                                settings: dict[str, Any], expected: str) -> None:
    with pytest.raises(OptionError, match=expected):
        quantize(folders[0], tmp_path / "q", QuantizeSettings("fp8", **settings))
    assert not (tmp_path / "q").exists()


def test_cli_and_its_own_format_only(folders: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", str(folders[0]), str(tmp_path / "q"), "--experts", "fp8"]) == 0
    assert "experts quantized to fp8;" in capsys.readouterr().out
    with pytest.raises(OptionError, match="--experts int8: .* holds fp8 expert records"):
        offload_rt.load(tmp_path / "q", experts="int8")
    with pytest.raises(CheckpointError, match="already quantized"):  # not a source
        quantize(tmp_path / "q", tmp_path / "again", QuantizeSettings("int8"))
