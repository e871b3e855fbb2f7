"""fp8 checkpoints: what is refused and how it is named (config.json and the field, or the file
and the tensor), and the command line (``generate``, ``chat``, ``bench``) on an fp8 folder.

Every variant offload_rt does not compute exactly is refused by name: static activation
quantization, other compressed-tensors formats and weight types, asymmetric or grouped
weights, KV cache / output quantization, sparsity, ``ue8m0`` scales, fp4 experts; and files
that disagree with their config (a missing or misshapen scale, activation scales, fp8
embeddings, experts in two formats, no fp8 tensor at all).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import TinySpec, read_safetensors
from safetensors.torch import save_file
from test_flags import assert_refused, cli
from test_quant_fp8 import SPEC, VARIANTS, Fp8Variant, make_fp8_checkpoint

import offload_rt
from offload_rt.checkpoint import Checkpoint
from offload_rt.cli import main
from offload_rt.errors import CheckpointError, OffloadError, OptionError

W1 = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
GROUP = "config_groups.group_0"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_fp8_checkpoint(tmp_path_factory.mktemp(name), SPEC, VARIANTS[name])
        return made[name]

    return get


@pytest.fixture
def copy_of(folders: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    return lambda name: Path(shutil.copytree(folders(name), tmp_path / name))


def _edit_config(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))
    return path


def _edit_tensors(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    path = model_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    edit(tensors)
    save_file(tensors, path, metadata)
    return path


def _refused(model_dir: Path, *words: str) -> None:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(model_dir)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def _weights(**changes: object) -> Callable[[dict[str, Any]], None]:
    return lambda q: q["config_groups"]["group_0"]["weights"].update(changes)


CT_REFUSALS: dict[str, tuple[Callable[[dict[str, Any]], None], list[str]]] = {
    "static-activations": (
        lambda q: q["config_groups"]["group_0"]["input_activations"].update(
            dynamic=False, strategy="tensor"),
        [f"{GROUP}.input_activations.dynamic", "static activation quantization"]),
    "pack-quantized": (lambda q: q.update(format="pack-quantized"),
                       ["quantization_config.format", "'pack-quantized'"]),
    "int-weights": (_weights(type="int"), [f"{GROUP}.weights.type", "'int'"]),
    "4-bit": (_weights(num_bits=4), [f"{GROUP}.weights.num_bits", "4"]),
    "asymmetric": (_weights(symmetric=False), [f"{GROUP}.weights.symmetric"]),
    "group-strategy": (_weights(strategy="group", group_size=32),
                       [f"{GROUP}.weights.group_size"]),
    "tensor-group": (_weights(strategy="tensor_group"),
                     [f"{GROUP}.weights.strategy", "'tensor_group'"]),
    "kv-cache": (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}),
                 ["quantization_config.kv_cache_scheme"]),
    "output": (lambda q: q["config_groups"]["group_0"].update(output_activations={"x": 1}),
               [f"{GROUP}.output_activations"]),
    "sparse": (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}),
               ["quantization_config.sparsity_config"]),
    "two-schemes": (lambda q: q["config_groups"].update(group_1={
        "targets": ["re:.*experts.*"], "weights": {
            **q["config_groups"]["group_0"]["weights"], "strategy": "tensor"}}),
        ["quantization_config.config_groups", "differently"]),
    "no-groups": (lambda q: q.pop("config_groups"), ["quantization_config.config_groups"]),
}


@pytest.mark.parametrize("case", list(CT_REFUSALS))
def test_compressed_tensors_variants_are_refused_by_field(copy_of: Callable[[str], Path],
                                                          case: str) -> None:
    edit, words = CT_REFUSALS[case]
    path = _edit_config(copy_of("ct-channel"), edit)
    _refused(path.parent, str(path), "quant_method compressed-tensors", *words)


HF_REFUSALS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "static": ({"activation_scheme": "static"},
               ["quantization_config.activation_scheme", "'static'", "static activation"]),
    "ue8m0": ({"scale_fmt": "ue8m0"}, ["quantization_config.scale_fmt", "'ue8m0'"]),
    "fp4-experts": ({"expert_dtype": "fp4"}, ["quantization_config.expert_dtype", "'fp4'"]),
    "bad-block": ({"weight_block_size": [128]}, ["quantization_config.weight_block_size"]),
    "kv-cache": ({"kv_cache_scheme": "static"}, ["quantization_config.kv_cache_scheme"]),
}


@pytest.mark.parametrize("case", list(HF_REFUSALS))
def test_transformers_fp8_variants_are_refused_by_field(copy_of: Callable[[str], Path],
                                                        case: str) -> None:
    changes, words = HF_REFUSALS[case]
    path = _edit_config(copy_of("hf-block"), lambda q: q.update(changes))
    _refused(path.parent, str(path), "quant_method fp8", *words)


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.pop(name)


def _add(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({name: value})


def _mixed_experts(t: dict[str, torch.Tensor]) -> None:
    t[W1] = t[W1].float() * t.pop(W1.removesuffix("weight") + "weight_scale").float()


TENSOR_REFUSALS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], list[str]]] = {
    "missing-scale": (_drop(W1.removesuffix("weight") + "weight_scale"),
                      [f"'{W1}' is F8_E4M3 but its scale", "is missing"]),
    "scale-shape": (_add(W1.removesuffix("weight") + "weight_scale", torch.ones(3, 1)),
                    ["weight_scale' has shape [3, 1]", "[128, 1]"]),
    "scale-dtype": (_add(W1.removesuffix("weight") + "weight_scale",
                         torch.ones(128, 1, dtype=torch.int32)), ["fp8 scales are float32"]),
    "input-scale": (_add(W1.removesuffix("weight") + "input_scale", torch.ones(1)),
                    ["input_scale'", "static activation"]),
    "zero-point": (_add(W1.removesuffix("weight") + "weight_zero_point", torch.zeros(128, 1)),
                   ["weight_zero_point'", "asymmetric"]),
    "fp8-embedding": (lambda t: t.update({"model.embed_tokens.weight": t[
        "model.embed_tokens.weight"].to(torch.float8_e4m3fn)}),
        ["'model.embed_tokens.weight' is F8_E4M3", "linear layers"]),
    "mixed-experts": (_mixed_experts, [f"'{W1}' has dtype torch.float32", "one format"]),
    "orphan-scale": (_add("lm_head.weight_scale", torch.ones(128, 1)),
                     ["'lm_head.weight_scale' scales a weight that is not F8_E4M3"]),
    "weight-shape": (lambda t: t.update({W1: t[W1][:64]}),
                     [f"'{W1}' has shape [64, 64], the config implies [128, 64]"]),
    "missing-expert": (lambda t: [t.pop(W1), t.pop(W1.removesuffix("weight") + "weight_scale")],
                       [f"'{W1}' is missing from the weight files"]),
}


@pytest.mark.parametrize("case", list(TENSOR_REFUSALS))
def test_files_that_disagree_with_their_config_are_refused_by_tensor(
        copy_of: Callable[[str], Path], case: str) -> None:
    edit, words = TENSOR_REFUSALS[case]
    path = _edit_tensors(copy_of("ct-channel"), edit)
    where = path.parent if case == "missing-expert" else path  # a missing tensor: the folder
    _refused(path.parent, str(where), *words)


def test_a_config_without_fp8_tensors_is_refused(copy_of: Callable[[str], Path]) -> None:
    model_dir = copy_of("ct-channel")
    reference = make_fp8_checkpoint(model_dir.parent / "float", SPEC, VARIANTS["ct-channel"],
                                    model_dir.parent / "dequantized")
    shutil.copyfile(reference.parent / "dequantized" / "model.safetensors",
                    model_dir / "model.safetensors")
    _refused(model_dir, str(model_dir / "config.json"), "no tensor in the weight files is F8_E4M3")


def test_e5m2_weights_are_refused_by_dtype(copy_of: Callable[[str], Path]) -> None:
    path = _edit_tensors(copy_of("ct-channel"),
                         lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.float8_e5m2)}))
    _refused(path.parent, str(path), f"'{Q_PROJ}'", "'F8_E5M2'", "quantized checkpoint")


def test_blocks_that_do_not_divide_the_experts_are_refused(tmp_path: Path) -> None:
    """Block rows must divide intermediate_size: w1's and w3's scales are stacked."""
    v = Fp8Variant(method="fp8", strategy="block", block=(48, 32), scale_dtype=torch.float32,
                   scale_name="weight_scale_inv")
    model_dir = make_fp8_checkpoint(tmp_path, SPEC, v)
    Checkpoint.open(model_dir).close()  # the files agree with the config
    with pytest.raises(CheckpointError, match="blocks of 48 rows do not divide "
                                              "intermediate_size 128"):
        offload_rt.load(model_dir)


# ---- options and the command line --------------------------------------------------------------

def test_other_expert_formats_are_refused_naming_both(folders: Callable[[str], Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = folders("ct-channel")
    with pytest.raises(OptionError, match="--experts int8: .*holds fp8 expert records"):
        offload_rt.load(model_dir, experts="int8")
    assert_refused(*cli(capsys, "generate", model_dir, "--prompt-ids", "1,2", "--experts",
                        "float"), "--experts float", "fp8")


def test_experts_fp8_names_the_folders_own_format(folders: Callable[[str], Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--experts fp8 was an argparse 'invalid choice' even on an fp8 folder."""
    with offload_rt.load(folders("ct-channel"), experts="fp8", max_seq_len=16) as rt:
        assert rt.expert_format.name == "fp8"
    code, _out, err = cli(capsys, "generate", folders("ct-channel"), "--prompt-ids", "1,2",
                          "--max-new-tokens", "2", "--experts", "fp8")
    assert code == 0, err


def test_quantize_refuses_an_fp8_source(folders: Callable[[str], Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(*cli(capsys, "quantize", folders("hf-block"), tmp_path / "out", "--experts",
                        "int8"), "already quantized", "quant_method fp8")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=32000, tokenizer=True, num_experts=8, hidden_size=64,
                    intermediate_size=128, num_heads=4, num_kv_heads=2, seed=72)
    return make_fp8_checkpoint(tmp_path_factory.mktemp("fp8_chat"), spec, VARIANTS["ct-tensor"])


def test_generate_and_bench_run_an_fp8_folder(chat_folder: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "generate", chat_folder, "--prompt", "Hello", "--max-new-tokens",
                         "4", "--cache-experts", "2", "--json")
    assert code == 0, err
    stats = json.loads(out.splitlines()[-1])["stats"]
    assert len(json.loads(out.splitlines()[-1])["token_ids"]) == 4 and stats["misses"] > 0
    code, out, err = cli(capsys, "bench", chat_folder, "--prompt-tokens", "4", "--new-tokens",
                         "2", "--repeats", "1", "--cache-experts", "2", "--json")
    assert code == 0, err
    bench = json.loads(out.splitlines()[-1])
    assert bench["offloaded"] and bench["same_tokens_every_run"], bench


def test_chat_runs_an_fp8_folder(chat_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code = main(["chat", str(chat_folder), "--temperature", "0", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip(), err


@pytest.mark.parametrize("name", ["model.layers.0.block_sparse_moe.experts.1.w2.weight_scale",
                                  "model.layers.1.self_attn.q_proj.weight_scale"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_scale_that_is_not_finite_names_its_tensor(copy_of: Callable[[str], Path],
                                                     name: str, value: float) -> None:
    """Break-it: an inf/NaN scale ran, and the run stopped later with 'the model produced
    non-finite logits', naming neither file nor tensor (or never, if no prompt used that
    expert). Attention scales are read at load, an expert's when the expert is read."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    model_dir = copy_of("ct-channel")
    _edit_tensors(model_dir, edit)
    with pytest.raises(OffloadError, match=f"tensor '{re.escape(name)}' holds a scale of "), \
            offload_rt.load(model_dir, offload=False, max_seq_len=16) as rt:
        rt.generate([1, 2, 3], max_new_tokens=1)
