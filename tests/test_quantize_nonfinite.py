"""Weights holding NaN or infinity (breaker findings): before, int8 quantization turned such a
row into scale 1 and zeros, so `--trunk int8` / `--experts int8` ran with the bad row silently
zeroed (the float model reports non-finite logits), and `offload-rt quantize` wrote folders
its own loader then refused as corrupt; the fp8 reader took a negative scale."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, find_tensor_file, make_hf_checkpoint, read_safetensors
from safetensors.torch import save_file

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import CheckpointError, NumericalError
from offload_rt.quant.int8 import quantize_int8
from offload_rt.quant.quantize import QuantizeSettings, quantize

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, vocab_size=256, seed=53)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERT_W1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("nonfinite") / "float", SPEC)


def poisoned(source: Path, dst: Path, name: str, value: float, rows: slice) -> Path:
    """A copy of ``source`` with ``value`` written into ``rows`` of tensor ``name``."""
    shutil.copytree(source, dst)
    path = find_tensor_file(dst, name)
    metadata, tensors = read_safetensors(path)
    t = tensors[name].clone()
    t[rows] = value
    tensors[name] = t
    save_file(tensors, path, metadata)
    return dst


def test_int8_keeps_a_non_finite_row_non_finite() -> None:
    w = torch.randn(4, 16)
    w[1, 3], w[2, 0] = float("nan"), float("inf")
    w[3] = 0
    _, scale = quantize_int8(w, torch.bfloat16)
    assert scale[1].isnan() and scale[2].isinf() and scale[3] == 1 and torch.isfinite(scale[0])


@pytest.mark.parametrize("options", [{"trunk": "int8"}, {"trunk": "int8", "experts": "int4"}])
def test_a_nan_row_quantized_at_load_is_reported_like_the_float_model(
        source: Path, tmp_path: Path, options: dict) -> None:
    bad = poisoned(source, tmp_path / "bad", Q_PROJ, float("nan"), slice(3, 4))
    for opts in ({}, options):
        with offload_rt.load(bad, dtype="float32", max_seq_len=32, **opts) as rt, \
                pytest.raises(NumericalError, match="non-finite"):
            rt.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)


def test_a_nan_expert_quantized_at_load_as_int8_is_reported(source: Path,
                                                           tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    for e in range(SPEC.num_experts):  # whichever expert the router picks
        name = EXPERT_W1.replace("experts.2", f"experts.{e}").replace("layers.1", "layers.0")
        path = find_tensor_file(bad, name)
        metadata, tensors = read_safetensors(path)
        tensors[name] = tensors[name].clone().index_fill_(0, torch.tensor([5]), float("nan"))
        save_file(tensors, path, metadata)
    with offload_rt.load(bad, dtype="float32", max_seq_len=32, experts="int8") as rt, \
            pytest.raises(NumericalError, match="non-finite"):
        rt.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)


@pytest.mark.parametrize(("experts", "trunk", "name", "value", "words"), [
    ("int8", False, EXPERT_W1, float("nan"), "layer 1, expert 2, w1, w3"),
    ("int4", False, EXPERT_W1, float("inf"), "layer 1, expert 2, w1, w3"),
    ("fp8", False, EXPERT_W1, float("nan"), EXPERT_W1),
    ("int8", True, Q_PROJ, float("inf"), Q_PROJ),
])
def test_quantize_refuses_non_finite_source_weights_by_name(
        source: Path, tmp_path: Path, experts: str, trunk: bool, name: str, value: float,
        words: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = poisoned(source, tmp_path / "bad", name, value, slice(7, 8))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        quantize(bad, out, QuantizeSettings(experts, trunk="int8" if trunk else "float"))
    message = str(info.value)
    assert str(bad) in message and words in message and "NaN or infinity" in message, message
    assert "1 of" in message
    assert not out.exists() and not list(tmp_path.glob("out*"))  # nothing half-written left
    flags = ["--trunk", "int8"] if trunk else []
    code = main(["quantize", str(bad), str(out), "--experts", experts, *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("offload-rt: error: ") and "Traceback" not in err


def test_fp8_reader_refuses_a_negative_scale(source: Path, tmp_path: Path) -> None:
    fp8 = tmp_path / "fp8"
    quantize(source, fp8, QuantizeSettings("fp8"))
    scale = EXPERT_W1.removesuffix("weight") + "weight_scale"
    path = find_tensor_file(fp8, scale)
    metadata, tensors = read_safetensors(path)
    tensors[scale] = -tensors[scale]
    save_file(tensors, path, metadata)
    with pytest.raises(CheckpointError, match=rf"'{scale}' holds a scale of -.*negative"), \
            offload_rt.load(fp8, dtype="float32", max_seq_len=32, offload=False):
        pass
