"""Families are picked by config.json's model_type; each reads its own fields by its own table.

The registry: every family's field table covers what its transformers config class declares
and is the one docs/model_fields.md shows; unknown model types and gpt-oss are refused naming
what is missing; each field a family does not implement is refused by file and name, and its
harmless fields change no logit (transformers' or ours). The command line runs each family
from its folder (generate, trace, bench; prompts as token ids).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from checkpoint_factory import (
    FAMILY_CLASSES,
    FamilySpec,
    load_reference_model,
    make_family_checkpoint,
)
from test_model_fields import documented

import offload_rt
from offload_rt import families, model_fields
from offload_rt.checkpoint import Checkpoint
from offload_rt.cli import main
from offload_rt.errors import CheckpointError

IDS = [3, 17, 5, 99, 42, 8, 64, 1, 23, 77]
SPECS = {
    "qwen2_moe": FamilySpec("qwen2_moe", seed=41),
    "qwen3_moe": FamilySpec("qwen3_moe", num_experts=16, top_k=4, head_dim=16, seed=42),
    "olmoe": FamilySpec("olmoe", num_experts=16, top_k=4, clip_qkv=2.0, seed=43),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: make_family_checkpoint(tmp_path_factory.mktemp(name), spec)
            for name, spec in SPECS.items()}


@pytest.fixture
def folder(originals: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A fresh copy of a family's folder, to edit."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(originals[name], tmp_path / name))
    return copy


def edit_json(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def raises(*parts: str) -> pytest.RaisesContext[CheckpointError]:
    return pytest.raises(CheckpointError, match=".*".join(re.escape(p) for p in parts))


# --- the registry and its tables ----------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILY_CLASSES))
def test_each_family_table_covers_its_transformers_config(name: str) -> None:
    declared = set(getattr(transformers, FAMILY_CLASSES[name][0])().to_dict())
    assert declared <= set(families.get(name).fields)


@pytest.mark.parametrize("name", list(FAMILY_CLASSES))
def test_each_family_table_is_documented(name: str) -> None:
    """docs/model_fields.md has a section per family listing the fields it reads besides the
    common ones (the config.json rows other than Mixtral's own)."""
    table = dict(families.get(name).fields)
    common = model_fields.COMMON_HF_FIELDS
    own = {k: v for k, v in table.items() if common.get(k) != v}
    assert documented()[f"config.json: {name}"] == own
    assert all(table[k] == v for k, v in common.items())


def test_mixtral_is_the_registered_table_of_the_config_json_section() -> None:
    assert families.get("mixtral").fields == model_fields.HF_FIELDS
    assert set(families.FAMILIES) == {"mixtral", *FAMILY_CLASSES}


def test_family_is_found_by_architectures_without_model_type(folder: Callable[[str], Path]
                                                             ) -> None:
    path = folder("qwen3_moe")
    edit_json(path / "config.json", lambda c: c.pop("model_type"))
    assert Checkpoint.open(path).config.family == "qwen3_moe"


@pytest.mark.parametrize(("model_type", "words"), [
    ("deepseek_v3", ["unsupported architecture", "'deepseek_v3'",
                     "mixtral, qwen2_moe, qwen3_moe, olmoe"]),
    ("gpt_oss", ["model_type 'gpt_oss' is not supported", "attention sinks",
                 "sliding-window attention on alternate layers", "expert biases",
                 "swiglu_limit", "MXFP4"]),
])
def test_unknown_and_unimplemented_model_types_are_named(folder: Callable[[str], Path],
                                                         model_type: str, words: list[str]
                                                         ) -> None:
    path = folder("olmoe")
    edit_json(path / "config.json", lambda c: c.update(model_type=model_type,
                                                       architectures=["X"]))
    with raises(str(path / "config.json"), *words):
        Checkpoint.open(path)


# --- fields each family does not implement ------------------------------------------------------

REFUSALS = [
    ("qwen2_moe", {"decoder_sparse_step": 2}, ["'decoder_sparse_step'", "layers [0]",
                                               "dense MLP layers"]),
    ("qwen2_moe", {"mlp_only_layers": [1]}, ["'mlp_only_layers'", "layers [1]"]),
    ("qwen2_moe", {"mlp_only_layers": "1"}, ["'mlp_only_layers' must be a list"]),
    ("qwen2_moe", {"use_sliding_window": True}, ["use_sliding_window true", "qwen2_moe"]),
    ("qwen2_moe", {"layer_types": ["full_attention", "sliding_attention"]},
     ["'layer_types'", "'sliding_attention'"]),
    ("qwen2_moe", {"qkv_bias": "true"}, ["'qkv_bias' must be true or false"]),
    ("qwen2_moe", {"norm_topk_prob": 1}, ["'norm_topk_prob' must be true or false"]),
    ("qwen2_moe", {"moe_intermediate_size": None}, ["missing required field",
                                                    "'moe_intermediate_size'"]),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0},
     ["'shared_expert_intermediate_size' must be a positive integer"]),
    ("qwen3_moe", {"attention_bias": True}, ["attention_bias true", "no biases"]),
    ("qwen3_moe", {"mlp_only_layers": [0, 1]}, ["'mlp_only_layers'", "layers [0, 1]"]),
    ("qwen3_moe", {"num_experts": 8}, ["'num_experts' (8)", "'num_local_experts' (16)",
                                       "disagree"]),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 0},
     ["'sliding_window' must be a positive integer"]),
    ("olmoe", {"head_dim": 16}, ["'head_dim' 16", "hidden_size 32"]),
    ("olmoe", {"clip_qkv": 0}, ["'clip_qkv' must be a number > 0", "clamped"]),
    ("olmoe", {"clip_qkv": "8"}, ["'clip_qkv' must be a number > 0"]),
    ("olmoe", {"attention_bias": True}, ["attention_bias true"]),
    ("olmoe", {"num_experts": None, "num_local_experts": None},
     ["missing required field 'num_experts'"]),
]


@pytest.mark.parametrize(("name", "edit", "words"), REFUSALS,
                         ids=[f"{n}-{'-'.join(e)}" for n, e, _ in REFUSALS])
def test_fields_a_family_does_not_implement_are_refused_by_name(
        folder: Callable[[str], Path], name: str, edit: dict[str, Any], words: list[str]
) -> None:
    path = folder(name)
    edit_json(path / "config.json", lambda c: c.update(edit))
    with raises(str(path / "config.json"), *words):
        Checkpoint.open(path)


@pytest.mark.parametrize(("name", "edit"), [
    ("qwen2_moe", {"use_sliding_window": False, "mlp_only_layers": [], "decoder_sparse_step": 1,
                   "layer_types": ["full_attention"] * 2}),
    ("qwen3_moe", {"attention_bias": False, "use_sliding_window": False, "num_experts": 16}),
    ("olmoe", {"head_dim": 8, "clip_qkv": None, "attention_bias": None}),
])
def test_neutral_values_load(folder: Callable[[str], Path], name: str,
                             edit: dict[str, Any]) -> None:
    path = folder(name)
    edit_json(path / "config.json", lambda c: c.update(edit))
    assert Checkpoint.open(path).config.family == name


HARMLESS = {  # family -> edits its table calls harmless (read by layers or options it refuses)
    "qwen2_moe": {"intermediate_size": 999, "sliding_window": 4, "max_window_layers": 1,
                  "router_aux_loss_coef": 0.5, "output_router_logits": True},
    "qwen3_moe": {"intermediate_size": 999, "router_aux_loss_coef": 0.5},
}


@pytest.mark.parametrize("name", list(HARMLESS))
def test_harmless_fields_change_no_logit(originals: dict[str, Path],
                                         folder: Callable[[str], Path], name: str) -> None:
    fields = families.get(name).fields
    assert all(fields[k] == model_fields.HARMLESS for k in HARMLESS[name])
    path = folder(name)
    edit_json(path / "config.json", lambda c: c.update(HARMLESS[name]))
    with torch.inference_mode():
        before, after = (load_reference_model(d)(torch.tensor([IDS])).logits
                         for d in (originals[name], path))
    assert torch.equal(before, after)
    ours = [offload_rt.load(d, dtype="float32").model(torch.tensor(IDS), 0)
            for d in (originals[name], path)]
    assert torch.equal(*ours)


# --- the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_command_line_runs_each_family(originals: dict[str, Path], name: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, spec = originals[name], SPECS[name]
    ids = ",".join(map(str, IDS))
    offload = ["--cache-experts", str(spec.top_k), "--prefetch", "1", "--dtype", "float32"]
    assert main(["generate", str(model_dir), "--prompt-ids", ids, "--max-new-tokens", "6",
                 "--ignore-eos", "--json", *offload]) == 0
    out = json.loads(capsys.readouterr().out)
    with offload_rt.load(model_dir, dtype="float32", offload=False) as rt:
        assert out["token_ids"] == rt.generate(IDS, max_new_tokens=6,
                                               ignore_eos=True).token_ids
    trace = tmp_path / "t.jsonl"
    assert main(["trace", str(model_dir), "--prompt-ids", ids, "--max-new-tokens", "4",
                 "--trace", str(trace), *offload]) == 0
    header = json.loads(trace.read_text().splitlines()[0])
    assert (header["num_experts"], header["top_k"]) == (spec.num_experts, spec.top_k)
    assert header["model"]["family"] == name
    assert main(["bench", str(model_dir), "--prompt-tokens", "6", "--new-tokens", "3",
                 "--repeats", "1", "--json", *offload]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["options"]["cache_experts_per_layer"] == spec.top_k


def test_command_line_names_an_unsupported_model_type(folder: Callable[[str], Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = folder("qwen3_moe")
    edit_json(path / "config.json", lambda c: c.update(model_type="gpt_oss"))
    assert main(["generate", str(path), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload-rt: error: ") and "gpt_oss" in err and "Traceback" not in err
