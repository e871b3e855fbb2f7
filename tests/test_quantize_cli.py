"""``offload-rt quantize`` as a user runs it: exit codes, error lines, the output folder that
appears only when complete, Ctrl-C, and (once the runtime reads quantized folders) the tokens
a written folder generates. What the files hold: tests/test_quant_writer.py."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint, make_mistral_checkpoint

from offload_rt import cli_quantize
from offload_rt.cli import build_parser, main
from offload_rt.quant import output_dir, quantize, writer
from offload_rt.quant.formats import Int8Format

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = TinySpec(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)
INT8 = ("--experts", "int8")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("qcli") / "model", SPEC)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (transformers' save bar) is not the command's
    code = main(["quantize", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(parent: Path) -> list[str]:
    """Hidden staging folders a run left next to its OUT_DIR."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".partial-", ".old-")))


def assert_error(result: tuple[int, str, str], *parts: str) -> None:
    code, out, err = result
    assert code == 2 and out == "", err
    assert err.startswith("offload-rt: error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, (part, err)


# ---- success ------------------------------------------------------------------------------------


def test_quantize_writes_the_folder_and_prints_a_summary(capsys: pytest.CaptureFixture[str],
                                                         src: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    code, stdout, err = run(capsys, src, out, *INT8)
    assert code == 0, err
    n = SPEC.num_layers * SPEC.num_experts
    assert stdout.startswith(f"{out}: {n} experts quantized to int8; weights ")
    assert " in, " in stdout and " out (0." in stdout and stdout.endswith(" s\n")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["experts"] == \
        {"format": "int8", "scale_dtype": "bfloat16"}
    assert leftovers(tmp_path) == []


def test_an_empty_out_dir_is_used_and_force_replaces_a_full_one(
        capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    assert run(capsys, src, out, *INT8)[0] == 0
    assert_error(run(capsys, src, out, *INT8), str(out), "exists and is not empty", "--force")
    (out / "stale.txt").write_text("old")
    code, _, err = run(capsys, src, out, "--experts", "int4", "--group-size", "32",
                       "--scale-dtype", "float16", "--force")
    assert code == 0, err
    assert not (out / "stale.txt").exists()
    spec = json.loads((out / "config.json").read_text())["quantization_config"]["experts"]
    assert (spec["format"], spec["group_size"], spec["scale_dtype"]) == ("int4", 32, "float16")
    assert leftovers(tmp_path) == []


def test_progress_bar_counts_experts_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert cli_quantize.expert_progress() is None  # pytest's stderr is no terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    update = cli_quantize.expert_progress()
    assert update is not None
    for done in range(1, 5):
        update(done, 4)
    shown = sys.stderr.getvalue()
    assert "quantizing" in shown and "0/4 " in shown and "expert/s" in shown


def test_cli_choices_are_the_drivers() -> None:
    """cli_quantize spells them out so `--help` needs no torch; they must not drift."""
    assert cli_quantize.FORMATS == quantize.FORMATS
    assert cli_quantize.SCALE_DTYPES == quantize.SCALE_DTYPES


# ---- errors -------------------------------------------------------------------------------------


def test_source_that_is_not_a_model_folder(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    assert_error(run(capsys, tmp_path / "nope", tmp_path / "q", *INT8),
                 f"{tmp_path / 'nope'}: model folder does not exist")
    (tmp_path / "empty").mkdir()
    assert_error(run(capsys, tmp_path / "empty", tmp_path / "q", *INT8),
                 "neither config.json", "nor params.json")
    assert not (tmp_path / "q").exists()


def test_quantized_sources_are_refused_by_name(capsys: pytest.CaptureFixture[str], src: Path,
                                               tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    assert run(capsys, src, ours, *INT8)[0] == 0
    assert_error(run(capsys, ours, tmp_path / "again", *INT8), f"{ours / 'config.json'}",
                 "already quantized", "quant_method offload_rt")
    gptq = tmp_path / "gptq"
    shutil.copytree(src, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    assert_error(run(capsys, gptq, tmp_path / "q", *INT8), "already quantized",
                 "quant_method gptq")
    assert not (tmp_path / "again").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize(("hidden", "inter", "field"), [(96, 128, "hidden_size 96"),
                                                        (64, 96, "intermediate_size 96")])
def test_dims_that_are_not_multiples_of_the_group_size(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, hidden: int, inter: int,
        field: str) -> None:
    model = make_hf_checkpoint(tmp_path / "m", TinySpec(hidden_size=hidden, num_heads=4,
                                                        intermediate_size=inter))
    assert_error(run(capsys, model, tmp_path / "q", "--experts", "int4"),
                 "--group-size 64", f"{model / 'config.json'} has {field}", "[32]")
    assert not (tmp_path / "q").exists()


def test_mistral_source_error_names_params_fields(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    model = make_mistral_checkpoint(tmp_path / "m", TinySpec(hidden_size=96, num_heads=4,
                                                             intermediate_size=128))
    assert_error(run(capsys, model, tmp_path / "q", "--experts", "int4", "--group-size", "64"),
                 f"{model / 'params.json'} has hidden_size 96 (dim)")


@pytest.mark.parametrize(("flags", "parts"), [
    (("--experts", "int4", "--group-size", "48"), ("--group-size 48", "32, 64, 128, 256")),
    (("--experts", "int8", "--group-size", "32"), ("--group-size applies to --experts int4",)),
    (("--experts", "int8", "--shard-size", "lots"), ("--shard-size", "lots")),
    (("--experts", "int8", "--shard-size", "auto"), ("--shard-size auto: give a size",)),
])
def test_flags_that_do_not_fit(capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path,
                               flags: tuple[str, ...], parts: tuple[str, ...]) -> None:
    assert_error(run(capsys, src, tmp_path / "q", *flags), *parts)
    assert not (tmp_path / "q").exists()


def test_usage_errors_from_argparse(capsys: pytest.CaptureFixture[str], src: Path,
                                    tmp_path: Path) -> None:
    assert run(capsys, src, tmp_path / "q")[0] == 2  # --experts is required
    code, _, err = run(capsys, src, tmp_path / "q", "--experts", "int3")
    assert code == 2 and "invalid choice: 'int3'" in err
    code, _, err = run(capsys, src, tmp_path / "q", "--experts", "int8", "--trunk", "int4")
    assert code == 2 and "invalid choice: 'int4'" in err  # the trunk is float or int8


def test_out_dir_that_is_or_holds_the_source(capsys: pytest.CaptureFixture[str], src: Path,
                                             tmp_path: Path) -> None:
    model = tmp_path / "outer" / "model"
    shutil.copytree(src, model)
    assert_error(run(capsys, model, model, *INT8, "--force"), "OUT_DIR is or holds the source")
    assert_error(run(capsys, model, tmp_path / "outer", *INT8, "--force"),
                 "OUT_DIR is or holds the source")
    assert (model / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    assert_error(run(capsys, src, tmp_path / "file", *INT8), "exists and is not a folder")


def test_too_little_disk_space_is_refused_before_writing(
        capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: usage(10**6, 0, 1000))
    assert_error(run(capsys, src, tmp_path / "q", *INT8), f"{tmp_path / 'q'}: not enough disk",
                 "needs", "(1,000 bytes) free")
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def test_disk_full_while_writing_removes_the_partial_folder(
        capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.pwrite, []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:  # header and a record written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    assert_error(run(capsys, src, tmp_path / "q", *INT8), f"{tmp_path / 'q'}: disk full",
                 "No space left on device", "needs", "free now")
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


# ---- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_leaves_no_out_dir_and_keeps_a_replaced_one(
        capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = Int8Format.encode, []

    def encode(self: Int8Format, *w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *w)

    monkeypatch.setattr(Int8Format, "encode", encode)
    code, _, err = run(capsys, src, tmp_path / "q", *INT8)
    assert code == 130 and "interrupted" in err
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("old")
    calls.clear()
    assert run(capsys, src, tmp_path / "q", *INT8, "--force")[0] == 130
    assert (tmp_path / "q" / "keep.txt").read_text() == "old"  # replaced only when complete
    assert leftovers(tmp_path) == []


SIGINT_SCRIPT = """
import sys, time
from pathlib import Path
from offload_rt.cli import main
from offload_rt.quant.formats import Int8Format

real, marker = Int8Format.encode, Path(sys.argv[1])
def encode(self, *w):
    if not marker.exists():
        marker.write_text("writing")
        time.sleep(60)  # Ctrl-C lands here, mid-run
    return real(self, *w)
Int8Format.encode = encode
sys.exit(main(["quantize", *sys.argv[2:]]))
"""


def test_sigint_to_the_process_exits_130_and_removes_the_partial_folder(
        src: Path, tmp_path: Path) -> None:
    marker, out = tmp_path / "marker", tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(marker), str(src),
                             str(out), *INT8], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(tmp_path) != []  # the staging folder exists while it writes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


# ---- end to end ---------------------------------------------------------------------------------


def runtime_runs_quantized_experts() -> bool:
    """Whether `offload-rt generate` takes --experts (on-the-fly quantization): the runtime
    side of quantized experts (reading quantized folders) lands with it."""
    _, unknown = build_parser().parse_known_args(
        ["generate", "m", "--prompt-ids", "1", "--experts", "int8"])
    return not unknown


@pytest.mark.skipif(not runtime_runs_quantized_experts(),
                    reason="the runtime does not run quantized experts yet (no --experts)")
@pytest.mark.parametrize("fmt", [INT8, ("--experts", "int4", "--group-size", "32")],
                         ids=["int8", "int4"])
def test_written_folder_generates_what_on_the_fly_quantization_does(
        capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path,
        fmt: tuple[str, ...]) -> None:
    """Same records either way (the file's values, bfloat16 scales), hence the same tokens."""
    out = tmp_path / "q"
    assert run(capsys, src, out, *fmt)[0] == 0
    flags = ["--prompt-ids", "1,5,9,3", "--max-new-tokens", "8", "--ignore-eos", "--json"]
    results = []
    for argv in (["generate", str(out), *flags], ["generate", str(src), *flags, *fmt]):
        code = main(argv)
        stdout, err = capsys.readouterr()
        assert code == 0, err
        results.append(json.loads(stdout))
    assert len(results[0]["token_ids"]) == 8
    assert results[0]["token_ids"] == results[1]["token_ids"]


@pytest.mark.skipif(not runtime_runs_quantized_experts(),
                    reason="the runtime does not run quantized experts yet (no --experts)")
def test_mistral_source_quantizes_to_what_its_hf_twin_does(
        capsys: pytest.CaptureFixture[str], src: Path, tmp_path: Path) -> None:
    """Same weights in the Mistral-native layout: the written HF folder generates the same
    tokens (trunk in HF rotary order, config.json equivalent to params.json)."""
    twin = make_mistral_checkpoint(tmp_path / "mistral", SPEC)
    flags = ["--prompt-ids", "1,5,9,3", "--max-new-tokens", "8", "--ignore-eos", "--json"]
    tokens = []
    for model in (src, twin):
        out = tmp_path / f"q-{model.name}"
        assert run(capsys, model, out, *INT8)[0] == 0
        code = main(["generate", str(out), *flags])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        tokens.append(json.loads(stdout)["token_ids"])
    assert tokens[0] == tokens[1]
