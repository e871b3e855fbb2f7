"""A quantization scale in a folder whose config declares no quantization that uses it is refused,
naming the file and the tensor (``offload_rt.unused_tensors``).

A float folder holding scales is a quantized model whose config does not say so (or a float one
with a leftover): loading it as float would compute a wrong answer without an error. Before,
the quantized formats' own names (``weight_scale``, ``input_scale``...) were refused by name, but
any other scale (``q_proj.scale``, a KV-cache ``k_scale``, Mistral's ``qscale_weight``) and a
``weight_scale`` beside a float matrix of an int8-trunk folder (whose own scales end so) were
"unexpected tensors ... not a mixtral checkpoint (config.json's model_type)?", naming the folder
only and guessing the wrong cause.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    make_mistral_checkpoint,
    make_quantized_checkpoint,
    read_safetensors,
)
from safetensors.torch import save_file

from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError
from offload_rt.quant.quantize import QuantizeSettings, quantize

SPEC = TinySpec(dtype=torch.bfloat16, seed=3)
ATTN = "model.layers.0.self_attn"
EXPERT = "model.layers.0.block_sparse_moe.experts.0"
ROUTER = "model.layers.0.block_sparse_moe.gate"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stray_scales")
    hf = make_hf_checkpoint(root / "hf", SPEC)
    int8_trunk = root / "int8_trunk"
    quantize(hf, int8_trunk, QuantizeSettings(experts="int8", trunk="int8"))
    return {"hf": hf, "mistral": make_mistral_checkpoint(root / "mistral", SPEC),
            "records": make_quantized_checkpoint(root / "records", SPEC),
            "int8_trunk": int8_trunk}


def _with_tensor(src: Path, tmp_path: Path, name: str) -> Path:
    """A copy of folder ``src`` whose first weight file also holds ``name`` (bf16 [1])."""
    folder = Path(shutil.copytree(src, tmp_path / src.name))
    path = min(folder.glob("*.safetensors"))
    metadata, tensors = read_safetensors(path)
    tensors[name] = torch.ones(1, dtype=torch.bfloat16)
    save_file(tensors, path, metadata)
    return path


@pytest.mark.parametrize(("folder", "name", "beside", "declared"), [
    ("hf", f"{ATTN}.q_proj.scale", f"'{ATTN}.q_proj.weight' (torch.bfloat16)",
     "config.json declares no quantization (no quantization_config)"),
    ("hf", f"{ATTN}.k_scale", None, "config.json declares no quantization"),
    ("hf", f"{EXPERT}.w1.weight.scale", f"'{EXPERT}.w1.weight' (torch.bfloat16)",
     "config.json declares no quantization"),
    ("mistral", "layers.0.attention.wq.qscale_weight",
     "'layers.0.attention.wq.weight' (torch.bfloat16)", "params.json declares no quantization"),
    ("records", f"{ATTN}.o_proj.scale", f"'{ATTN}.o_proj.weight' (torch.bfloat16)",
     "config.json declares quantized experts (quantization_config.experts)"),
    ("int8_trunk", f"{ROUTER}.weight_scale", f"'{ROUTER}.weight' (torch.bfloat16)",
     "config.json declares an int8 trunk (quantization_config.trunk)"),
    ("int8_trunk", "model.embed_tokens.weight_scale", "'model.embed_tokens.weight'",
     "belong to the int8 attention projections and LM head only"),
])
def test_a_scale_no_declared_quantization_uses_is_refused_by_file_and_tensor(
        folders: dict[str, Path], tmp_path: Path, folder: str, name: str,
        beside: str | None, declared: str) -> None:
    path = _with_tensor(folders[folder], tmp_path, name)
    with pytest.raises(CheckpointError) as caught:
        Checkpoint.open(path.parent)
    message = str(caught.value)
    assert message.startswith(f"{path}: tensor '{name}' is a quantization scale"), message
    assert declared in message and "wrong answer" in message
    assert (beside is None and " beside " not in message) or f"beside {beside}" in message
    assert "model_type" not in message


def test_the_quantized_formats_own_scale_names_stay_refused_as_such(
        folders: dict[str, Path], tmp_path: Path) -> None:
    """``weight_scale`` beside a float expert matrix was already refused by name (the
    compressed-tensors / fp8 spelling, ``model_fields.QUANTIZED_SUFFIXES``): kept so."""
    name = f"{EXPERT}.w1.weight_scale"
    path = _with_tensor(folders["hf"], tmp_path, name)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path}: quantized checkpoint (tensor '{name}') is not supported")):
        Checkpoint.open(path.parent)


def test_other_unused_tensors_keep_their_message(folders: dict[str, Path],
                                                 tmp_path: Path) -> None:
    path = _with_tensor(folders["hf"], tmp_path, f"{ATTN}.q_proj.lora_A")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path.parent}: unexpected tensors ['{ATTN}.q_proj.lora_A'] (1 in all): not a "
            "mixtral checkpoint")):
        Checkpoint.open(path.parent)


def test_the_folders_own_scales_load(folders: dict[str, Path]) -> None:
    for folder in folders.values():
        Checkpoint.open(folder).close()
