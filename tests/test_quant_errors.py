"""Quantized experts: what is refused, and how it is named (the file, field, tensor or flag),
through the API (``CheckpointError``/``OptionError``) and the command line (exit 2, one
``offload-rt: error: ...`` line). Other quant_methods stay refused (``test_model_fields.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    make_quantized_checkpoint,
    read_safetensors,
)
from safetensors.torch import save_file
from test_flags import assert_refused, cli

import offload_rt
from offload_rt.checkpoint import Checkpoint
from offload_rt.errors import CheckpointError, OptionError
from offload_rt.quant.select import select_format

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=96,
                num_heads=4, num_kv_heads=2, seed=61)
RECORD = "model.layers.1.block_sparse_moe.experts.2.record"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _words(*parts: str) -> str:
    return ".*".join(re.escape(p) for p in parts)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            made[name] = (make_hf_checkpoint(out, SPEC) if name == "float"
                          else make_quantized_checkpoint(out, SPEC, name, 32))
        return made[name]

    return get


@pytest.fixture
def copy_of(folders: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    import shutil

    return lambda name: Path(shutil.copytree(folders(name), tmp_path / name))


def edit_quant(model_dir: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    path = model_dir / "config.json"
    data = json.loads(path.read_text())
    edit(data["quantization_config"])
    path.write_text(json.dumps(data))
    return path


# ---- the folder --------------------------------------------------------------------------------

@pytest.mark.parametrize(("edit", "words"), [
    (lambda q: q["experts"].update(format="int3"), ["experts.format 'int3'", "int8", "int4"]),
    (lambda q: q["experts"].update(format="float"), ["experts.format 'float'"]),
    (lambda q: q.update(format_version=2), ["format_version 2", "version 1"]),
    (lambda q: q.update(record_bytes="big"), ["record_bytes must be a positive integer"]),
    (lambda q: q["experts"].update(scale_dtype="int8"), ["scale_dtype 'int8'"]),
])
def test_a_malformed_quantization_config_names_the_file_and_field(
        copy_of: Callable[[str], Path], edit: Callable[[dict[str, Any]], object],
        words: list[str]) -> None:
    path = edit_quant(copy_of("int8"), edit)
    with pytest.raises(CheckpointError, match=_words(str(path), *words)):
        Checkpoint.open(path.parent)


def test_record_bytes_that_do_not_fit_the_format(copy_of: Callable[[str], Path]) -> None:
    path = edit_quant(copy_of("int8"), lambda q: q.update(record_bytes=4096))
    with pytest.raises(CheckpointError, match=_words(str(path), "record_bytes is 4096",
                                                     "int8 record", "takes 20480 bytes")):
        Checkpoint.open(path.parent)


@pytest.mark.parametrize(("new", "words"), [
    (torch.zeros(4096, dtype=torch.uint8), ["has shape [4096]", "implies [20480]"]),
    (torch.zeros(20480 // 2, dtype=torch.bfloat16), ["has shape [10240]"]),
    (torch.zeros(20480, dtype=torch.int8), ["dtype torch.int8", "uint8 (U8)"]),
])
def test_a_wrong_record_tensor_names_the_file_and_tensor(
        copy_of: Callable[[str], Path], new: torch.Tensor, words: list[str]) -> None:
    model_dir = copy_of("int8")
    path = model_dir / "model.safetensors"
    metadata, tensors = read_safetensors(path)
    tensors[RECORD] = new
    save_file(tensors, path, metadata)
    with pytest.raises(CheckpointError, match=_words(str(path), f"'{RECORD}'", *words)):
        Checkpoint.open(model_dir)


def test_records_are_read_as_bytes_only(folders: Callable[[str], Path]) -> None:
    """A record is its file's bytes; it is never converted: reading it into a float buffer is
    refused."""
    model_dir = folders("int8")
    ckpt = Checkpoint.open(model_dir)
    raw = torch.empty(ckpt.quantization.record_bytes, dtype=torch.uint8)  # type: ignore[union-attr]
    assert ckpt.expert(1, 2).nbytes == raw.numel()
    ckpt.read_expert_into(1, 2, raw, drop_page_cache=True)
    assert torch.equal(raw, read_safetensors(model_dir / "model.safetensors")[1][RECORD])
    with pytest.raises(ValueError, match="raw record bytes"):
        ckpt.read_expert_into(1, 2, torch.empty(raw.numel(), dtype=torch.float32))
    ckpt.close()


def test_int4_records_of_another_cpu_layout(copy_of: Callable[[str], Path]) -> None:
    path = edit_quant(copy_of("int4"), lambda q: q["experts"].update(cpu_layout="avx2-0123"))
    with pytest.raises(CheckpointError, match=_words(str(path), "'avx2-0123'", "this machine",
                                                     "offload-rt quantize")):
        offload_rt.load(path.parent)


def test_an_int4_group_that_does_not_divide_the_model(copy_of: Callable[[str], Path]) -> None:
    """intermediate_size 96 is no multiple of 64."""
    path = edit_quant(copy_of("int4"), lambda q: q["experts"].update(group_size=64))
    with pytest.raises(CheckpointError, match=_words(str(path), "intermediate_size (96)",
                                                     "multiple")):
        Checkpoint.open(path.parent)


def test_int4_records_on_a_gpu_name_the_file(folders: Callable[[str], Path]) -> None:
    """Checked before any CUDA call, so it runs without a GPU."""
    ckpt = Checkpoint.open(folders("int4"))
    with pytest.raises(CheckpointError, match=_words(str(ckpt.quantization.source),  # type: ignore[union-attr]
                                                     "--device cpu only")):
        select_format(ckpt, None, None, torch.float32, CUDA)
    ckpt.close()


# ---- the options -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "experts"), [("int8", "int4"), ("int4", "int8"),
                                                ("int8", "float"), ("int4", "float")])
def test_a_quantized_folder_runs_as_its_own_format_only(folders: Callable[[str], Path],
                                                        name: str, experts: str) -> None:
    model_dir = folders(name)
    with pytest.raises(OptionError, match=_words(f"--experts {experts}", str(model_dir),
                                                 f"holds {name} expert records")):
        offload_rt.load(model_dir, experts=experts)
    with offload_rt.load(model_dir, experts=name, max_seq_len=16) as rt:  # its own: fine
        assert rt.expert_format.name == name


@pytest.mark.parametrize(("options", "words"), [
    ({"experts": "int3"}, ["--experts int3 (experts='int3')", "float, int8, int4"]),
    ({"experts": "fp8"}, ["--experts fp8", "has no fp8 experts", "use --experts int8 or int4"]),
    ({"group_size": 64}, ["--group-size 64 (group_size=64) applies to --experts int4 only"]),
    ({"experts": "int8", "group_size": 64}, ["--group-size 64", "experts='int8'"]),
    ({"experts": "int4", "group_size": 0}, ["--group-size (group_size=) must be >= 1"]),
    ({"experts": "int4", "group_size": 48}, ["--group-size 48", "32, 64, 128, 256"]),
    ({"experts": "int4", "group_size": 64}, ["--group-size 64 does not divide",
                                             "intermediate_size 96"]),
])
def test_option_errors_name_the_flags(folders: Callable[[str], Path], options: dict[str, Any],
                                      words: list[str]) -> None:
    with pytest.raises(OptionError, match=_words(*words)):
        offload_rt.load(folders("float"), **options)


def test_int4_at_load_on_a_gpu_is_refused_by_flag(folders: Callable[[str], Path]) -> None:
    ckpt = Checkpoint.open(folders("float"))
    with pytest.raises(OptionError, match=_words("--experts int4", "--device cpu only",
                                                 "--experts int8")):
        select_format(ckpt, "int4", 32, torch.float32, CUDA)
    assert select_format(ckpt, "int8", None, torch.float32, CUDA).name == "int8"
    ckpt.close()


# ---- the command line --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "argv", "words"), [
    ("float", ["--experts", "int4", "--group-size", "48"], ["--group-size 48"]),
    ("float", ["--experts", "int8", "--group-size", "32"], ["--group-size 32 (group_size=32) applies"]),
    ("int8", ["--experts", "float"], ["--experts float", "holds int8 expert records"]),
    ("int4", ["--experts", "int8"], ["--experts int8", "holds int4 expert records"]),
])
def test_command_line_refusals(capsys: pytest.CaptureFixture[str],
                               folders: Callable[[str], Path], name: str, argv: list[str],
                               words: list[str]) -> None:
    code, out, err = cli(capsys, "generate", folders(name), "--prompt-ids", "1,2,3",
                         "--max-new-tokens", "2", *argv)
    assert_refused(code, out, err, *words)


def test_command_line_layout_mismatch(capsys: pytest.CaptureFixture[str],
                                      copy_of: Callable[[str], Path]) -> None:
    path = edit_quant(copy_of("int4"), lambda q: q["experts"].update(cpu_layout="avx2-0123"))
    code, out, err = cli(capsys, "generate", path.parent, "--prompt-ids", "1,2,3")
    assert_refused(code, out, err, str(path), "'avx2-0123'")


def test_command_line_unknown_format_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                      folders: Callable[[str], Path]) -> None:
    code, out, err = cli(capsys, "generate", folders("float"), "--prompt-ids", "1,2,3",
                         "--experts", "int3")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "offload-rt generate: error: argument --experts: invalid choice: 'int3'" in err


@pytest.mark.parametrize("argv", [["--experts", "int8"], ["--experts", "int4"]])
def test_command_line_runs_the_demo_quantized_at_load(capsys: pytest.CaptureFixture[str],
                                                      argv: list[str]) -> None:
    code, out, err = cli(capsys, "generate", "--prompt", "The capital of France is",
                         "--max-new-tokens", "4", "--json", "--prefetch", "0", *argv)
    assert code == 0, err
    stats = json.loads(out.splitlines()[-1])["stats"]
    assert stats["misses"] > 0 and stats["offloaded"] is True
