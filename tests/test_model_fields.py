"""Every field of config.json / params.json is honoured, harmless, or refused by name.

The sweep itself: the code's field tables cover every field transformers' MixtralConfig and
GenerationConfig declare, and docs/model_fields.md lists each with the same treatment. Then
one test per refusal (file and field named), the "harmless" claim checked on the oracle,
config.json's dtype honoured, and quantized checkpoints named as such.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from checkpoint_factory import load_reference_model, read_safetensors
from safetensors.torch import save_file

import offload_rt
from offload_rt import generation_config, model_fields
from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "model_fields.md"
Q_PROJ = "model.layers.0.self_attn.q_proj"
IDS = [3, 17, 5, 99, 42, 8, 64, 1, 23, 77]


def raises(*parts: str) -> pytest.RaisesContext[CheckpointError]:
    return pytest.raises(CheckpointError, match=".*".join(re.escape(p) for p in parts))


def copy_of(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_json(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def hf_dir(tiny_hf_checkpoint: Path, tmp_path: Path) -> Path:
    return copy_of(tiny_hf_checkpoint, tmp_path)


@pytest.fixture
def mistral_dir(tiny_mistral_checkpoint: Path, tmp_path: Path) -> Path:
    return copy_of(tiny_mistral_checkpoint, tmp_path)


# --- the sweep ----------------------------------------------------------------------------------

def documented() -> dict[str, dict[str, str]]:
    """docs/model_fields.md: section ('config.json'...) -> field -> treatment."""
    out: dict[str, dict[str, str]] = {}
    section = ""
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            out[section] = {}
        elif m := re.match(r"\| `([^`]+)` \| ([a-z ]+?) \|", line):
            out[section][m.group(1)] = m.group(2)
    return out


def test_every_transformers_field_is_in_a_table() -> None:
    config_fields = set(transformers.MixtralConfig().to_dict()) | {
        "torch_dtype", "rope_theta", "rope_scaling", "quantization_config"}
    assert config_fields <= set(model_fields.HF_FIELDS)
    assert set(transformers.GenerationConfig().to_dict()) <= set(generation_config.FIELDS)


def test_the_docs_table_is_the_code_table() -> None:
    docs = documented()
    assert docs["config.json"] == model_fields.HF_FIELDS
    assert docs["params.json"] == model_fields.MISTRAL_FIELDS
    assert docs["generation_config.json"] == generation_config.FIELDS


HARMLESS_EDITS = {"attention_dropout": 0.5, "router_jitter_noise": 0.5,
                  "router_aux_loss_coef": 0.5, "output_router_logits": True,
                  "initializer_range": 0.5, "use_cache": False, "pad_token_id": 3,
                  "bos_token_id": 7, "chunk_size_feed_forward": 4}


def test_harmless_fields_change_no_logit_of_the_oracle_or_ours(hf_dir: Path,
                                                               tiny_hf_checkpoint: Path) -> None:
    """The 'harmless' rows, checked: transformers' eval-mode logits do not move."""
    assert all(model_fields.HF_FIELDS[k] == model_fields.HARMLESS for k in HARMLESS_EDITS)
    edit_json(hf_dir / "config.json", lambda c: c.update(HARMLESS_EDITS))
    with torch.inference_mode():
        before = load_reference_model(tiny_hf_checkpoint)(torch.tensor([IDS])).logits
        after = load_reference_model(hf_dir)(torch.tensor([IDS])).logits
    assert torch.equal(before, after)
    ours = [offload_rt.load(d, dtype="float32").model(torch.tensor(IDS), 0)
            for d in (tiny_hf_checkpoint, hf_dir)]
    assert torch.equal(*ours)


# --- refused fields -----------------------------------------------------------------------------

@pytest.mark.parametrize(("edit", "words"), [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}},
     ["quantized checkpoint", "quant_method gptq", "is not supported", "float32/bfloat16"]),
    ({"quantization_config": {"quant_method": "awq"}}, ["quant_method awq"]),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     ["quant_method bitsandbytes"]),
    ({"quantization_config": {"quant_method": "compressed-tensors"}},
     ["quant_method compressed-tensors"]),
    ({"quantization_config": {"quant_method": "fp8"}}, ["quant_method fp8"]),
    ({"attention_bias": True}, ["attention_bias true"]),
    ({"mlp_bias": True}, ["mlp_bias true"]),
    ({"sliding_window": 0}, ["'sliding_window' must be a positive integer"]),
    ({"sliding_window": "16"}, ["'sliding_window' must be a positive integer"]),
    ({"dtype": "int8"}, ["'dtype'", "int8"]),
    ({"dtype": None, "torch_dtype": "float8_e4m3fn"}, ["'torch_dtype'", "float8_e4m3fn"]),
    ({"eos_token_id": "</s>"}, ["'eos_token_id'"]),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, ["rope_type 'yarn' in rope_scaling"]),
])
def test_config_json_refusals_name_the_file_and_field(hf_dir: Path, edit: dict[str, Any],
                                                      words: list[str]) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.update(edit))
    with raises(str(hf_dir / "config.json"), *words):
        Checkpoint.open(hf_dir)


@pytest.mark.parametrize(("edit", "words"), [
    ({"quantization": {"qformat_weight": "fp8_e4m3"}}, ["quantized checkpoint", "quantization"]),
    ({"lora": {"rank": 8, "scaling": 2.0}}, ["'lora'"]),
    ({"vision_encoder": {"hidden_size": 1024}}, ["'vision_encoder'"]),
    ({"model_type": "mamba"}, ["model_type 'mamba'"]),
    ({"sliding_window": 16, "_sliding_window": 16}, ["sliding_window", "_sliding_window"]),
    ({"sliding_window": [16, 32]}, ["'sliding_window'", "different windows"]),
    ({"max_seq_len": 0}, ["'max_seq_len' must be a positive integer"]),
])
def test_params_json_refusals_name_the_file_and_field(mistral_dir: Path, edit: dict[str, Any],
                                                      words: list[str]) -> None:
    edit_json(mistral_dir / "params.json", lambda c: c.update(edit))
    with raises(str(mistral_dir / "params.json"), *words):
        Checkpoint.open(mistral_dir)


def test_neutral_values_of_refused_fields_load(hf_dir: Path) -> None:
    edit_json(hf_dir / "config.json", lambda c: c.update(
        attention_bias=False, mlp_bias=False, quantization_config=None))
    assert Checkpoint.open(hf_dir).config.hidden_size == 32


# --- quantized weights without a quantization_config --------------------------------------------

@pytest.mark.parametrize("suffix", ["qweight", "scales", "weight_scale", "SCB"])
def test_quantized_tensor_names_say_what_the_checkpoint_is(hf_dir: Path, suffix: str) -> None:
    """GPTQ/AWQ (qweight, scales), fp8 / compressed-tensors (weight_scale), bitsandbytes (SCB)
    without a quantization_config: was "tensor ...q_proj.weight is missing"."""
    path = hf_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    del tensors[f"{Q_PROJ}.weight"]
    tensors[f"{Q_PROJ}.{suffix}"] = torch.zeros(8, 4, dtype=torch.int32)
    save_file(tensors, path, metadata)
    with raises(str(path), "quantized checkpoint", f"'{Q_PROJ}.{suffix}'", "not supported"):
        Checkpoint.open(hf_dir)


def test_fp8_weights_name_their_dtype(hf_dir: Path) -> None:
    path = hf_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    tensors[f"{Q_PROJ}.weight"] = tensors[f"{Q_PROJ}.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, path, metadata)
    with raises(str(path), f"'{Q_PROJ}.weight'", "'F8_E4M3'", "quantized checkpoint"):
        Checkpoint.open(hf_dir)


# --- dtype --------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_config_dtype_is_the_default_compute_dtype(hf_dir: Path, key: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """transformers' from_pretrained computes in config.json's dtype (dtype="auto"); so do we,
    and say so when the weights differ. --dtype still decides."""
    edit_json(hf_dir / "config.json", lambda c: c.update({"dtype": None, key: "bfloat16"}))
    assert transformers.MixtralForCausalLM.from_pretrained(hf_dir).dtype == torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="offload_rt"):
        rt = offload_rt.load(hf_dir)
    assert rt.checkpoint.dtype == torch.float32
    assert rt.dtype == torch.bfloat16
    assert "bfloat16" in caplog.text and "float32" in caplog.text
    assert offload_rt.load(hf_dir, dtype="float32").dtype == torch.float32
