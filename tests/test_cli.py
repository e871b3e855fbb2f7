"""The ``offload-rt generate`` contract: flags, JSON shape, streaming, exit codes.

Most tests call ``main([...])`` in-process (capsys); two run the installed console script in a
subprocess, which is the only way to see exactly what a shell user sees (tracebacks, -v logging).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint
from sentencepiece import SentencePieceProcessor

import offload_rt
from cache_policies.registry import available_policies
from offload_rt.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
STATS_KEYS = ("tokens_per_s", "hits", "misses", "hit_rate", "bytes_moved", "stall_s",
              "prefetch_useful", "prefetch_wasted")
OFFLOAD_FLAGS = ("--cache-experts", "2", "--prefetch", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny model with the real Mixtral tokenizer (vocab 32000); hidden kept small for speed."""
    spec = TinySpec(vocab_size=32000, tokenizer=True, hidden_size=16, intermediate_size=16,
                    num_heads=2, num_kv_heads=1)
    return make_hf_checkpoint(tmp_path_factory.mktemp("cli_model"), spec)


@pytest.fixture(scope="module")
def sp(model_dir: Path) -> SentencePieceProcessor:
    """SentencePiece itself, as the oracle for prompt encoding."""
    return SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], model_dir: Path, *argv: str) -> dict[str, Any]:
    code, out, err = run(capsys, model_dir, "--json", *argv)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1, out  # stdout is exactly the JSON object
    return json.loads(lines[0])


# ---- --json -------------------------------------------------------------------------------------


def test_json_has_the_contract_fields(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    res = run_json(capsys, model_dir, "--prompt", PROMPT, "--max-new-tokens", "6", "--ignore-eos")
    assert {"prompt_token_ids", "token_ids", "text", "finish_reason", "stats"} <= set(res)
    assert len(res["token_ids"]) == 6
    assert res["finish_reason"] == "length"
    assert set(STATS_KEYS) <= set(res["stats"])
    assert res["stats"]["offloaded"] is False


def test_prompt_is_bos_plus_sentencepiece_ids(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                               sp: SentencePieceProcessor) -> None:
    res = run_json(capsys, model_dir, "--prompt", PROMPT, "--max-new-tokens", "1")
    assert res["prompt_token_ids"] == [sp.bos_id(), *sp.encode(PROMPT)]


def test_greedy_output_equals_the_python_api(capsys: pytest.CaptureFixture[str],
                                             model_dir: Path) -> None:
    res = run_json(capsys, model_dir, "--prompt", PROMPT, "--max-new-tokens", "8",
                   "--temperature", "0", "--ignore-eos")
    with offload_rt.load(model_dir) as rt:
        api = rt.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert res["token_ids"] == api.token_ids
    assert res["text"] == api.text
    assert res["prompt_token_ids"] == api.prompt_token_ids


@pytest.mark.parametrize("flags", [OFFLOAD_FLAGS, ("--cache-experts", "2", "--prefetch", "0",
                                                   "--policy", "lfu", "--pool", "global")])
def test_offloaded_run_matches_resident(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                        flags: tuple[str, ...]) -> None:
    common = ("--prompt", PROMPT, "--max-new-tokens", "8", "--ignore-eos")
    resident = run_json(capsys, model_dir, *common, "--no-offload")
    offloaded = run_json(capsys, model_dir, *common, *flags)
    assert offloaded["token_ids"] == resident["token_ids"]
    assert offloaded["stats"]["offloaded"] is True
    assert offloaded["stats"]["misses"] > 0
    assert resident["stats"]["offloaded"] is False


def test_prompt_ids_flag(capsys: pytest.CaptureFixture[str], model_dir: Path,
                         sp: SentencePieceProcessor) -> None:
    ids = [sp.bos_id(), *sp.encode(PROMPT)]
    by_ids = run_json(capsys, model_dir, "--prompt-ids", ",".join(map(str, ids)),
                      "--max-new-tokens", "4", "--ignore-eos")
    by_text = run_json(capsys, model_dir, "--prompt", PROMPT, "--max-new-tokens", "4",
                       "--ignore-eos")
    assert by_ids["prompt_token_ids"] == ids
    assert by_ids["token_ids"] == by_text["token_ids"]


def test_prompt_from_stdin(capsys: pytest.CaptureFixture[str], model_dir: Path,
                           monkeypatch: pytest.MonkeyPatch, sp: SentencePieceProcessor) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    res = run_json(capsys, model_dir, "--prompt", "-", "--max-new-tokens", "1")
    assert res["prompt_token_ids"] == [sp.bos_id(), *sp.encode(PROMPT)]  # newline dropped


def test_chat_wraps_the_prompt_in_the_template(capsys: pytest.CaptureFixture[str],
                                               model_dir: Path,
                                               sp: SentencePieceProcessor) -> None:
    res = run_json(capsys, model_dir, "--chat", "--prompt", "Hi there", "--max-new-tokens", "1")
    assert res["prompt_token_ids"] == [sp.bos_id(), *sp.encode("[INST] Hi there [/INST]")]


def test_stop_string_ends_generation(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    common = ("--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos")
    full = run_json(capsys, model_dir, *common)["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full  # a visible stop string, so the test means something
    res = run_json(capsys, model_dir, *common, "--stop", "no such text", "--stop", stop)
    assert res["finish_reason"] == "stop"
    assert res["text"] == full[:full.find(stop)]
    assert len(res["token_ids"]) < 12


# ---- streaming text -----------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(), OFFLOAD_FLAGS])
def test_text_mode_streams_text_and_summarizes(capsys: pytest.CaptureFixture[str],
                                               model_dir: Path, flags: tuple[str, ...]) -> None:
    common = ("--prompt", PROMPT, "--max-new-tokens", "8", "--ignore-eos", *flags)
    expected = run_json(capsys, model_dir, *common)
    code, out, err = run(capsys, model_dir, *common)
    assert code == 0, err
    assert out == expected["text"] + "\n"
    summary = err.strip().splitlines()[-1]
    assert "8 tokens (length)" in summary and "tok/s" in summary and "first token" in summary
    assert ("hit rate" in summary) == bool(flags)
    if flags:
        assert "moved" in summary and "stall" in summary


# ---- errors and exit codes ----------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "needle"), [
    (("--cpu-memory", "abc"), "--cpu-memory"),
    (("--max-seq-len", "4", "--max-new-tokens", "8"), "context length"),
    (("--chat", "--prompt-ids", "1,2"), "--chat"),
    (("--cache-experts", "99"), "--cache-experts"),
])
def test_offload_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                             argv: tuple[str, ...], needle: str) -> None:
    prompt = () if "--prompt-ids" in argv else ("--prompt", PROMPT)
    code, out, err = run(capsys, model_dir, *prompt, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("offload-rt: error: ") and needle in err
    assert "Traceback" not in err


def test_missing_model_dir_names_the_path(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    code, out, err = run(capsys, missing, "--prompt", "x")
    assert code == 2 and out == ""
    assert err.startswith("offload-rt: error: ") and str(missing) in err


@pytest.mark.parametrize(("argv", "needle"), [
    (("--prompt", "x", "--policy", "nope"), "unknown cache policy 'nope'"),
    (("--prompt", "x", "--policy", "no_such_pkg.mod:Cls"), "cannot import module"),
    (("--prompt-ids", "1,x"), "comma-separated"),
    (("--prompt", "x", "--dtype", "float8"), "invalid choice"),
    (("--prompt", "x", "--prompt-ids", "1"), "not allowed with"),
    (("--prompt", "x", "--max-new-tokens", "0"), "argument --max-new-tokens: must be >= 1"),
    ((), "one of the arguments --prompt --prompt-ids is required"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], model_dir: Path,
                             argv: tuple[str, ...], needle: str) -> None:
    code, out, err = run(capsys, model_dir, *argv)
    assert code == 2 and out == ""
    assert needle in err and "Traceback" not in err


def test_help_lists_the_policies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert all(name in out for name in available_policies())
    assert "pkg.module:Class" in out


def test_dotted_policy_path_is_accepted(capsys: pytest.CaptureFixture[str],
                                        model_dir: Path) -> None:
    res = run_json(capsys, model_dir, "--prompt", PROMPT, "--max-new-tokens", "2",
                   "--policy", "cache_policies.lru:LRUPolicy", *OFFLOAD_FLAGS)
    assert res["stats"]["offloaded"] is True


def test_keyboard_interrupt_exits_130(capsys: pytest.CaptureFixture[str], model_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(offload_rt, "load", interrupted)
    code, _, err = run(capsys, model_dir, "--prompt", "x")
    assert code == 130
    assert "interrupted" in err and "Traceback" not in err


def test_out_of_vocabulary_prompt_id_is_an_error(capsys: pytest.CaptureFixture[str],
                                                 model_dir: Path) -> None:
    code, _, err = run(capsys, model_dir, "--prompt-ids", "1,99999", "--max-new-tokens", "1")
    assert code == 2 and "99999" in err


# ---- the installed console script ---------------------------------------------------------------


def console_script(*argv: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run `offload-rt` as a shell would, importing this source tree (not another install)."""
    script = Path(sys.executable).parent / "offload-rt"
    exe = str(script) if script.exists() else shutil.which("offload-rt")
    if exe is None:
        pytest.skip("the offload-rt console script is not installed (pip install -e .)")
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # One intra-op thread: on a busy CI box each OpenMP region of a tiny op can otherwise wait
    # ~0.1 s for its sleeping workers, which makes this test slow without testing anything.
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([exe, *map(str, argv)], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_console_script_streams_from_stdin_with_verbose_log(model_dir: Path) -> None:
    with offload_rt.load(model_dir) as rt:
        expected = rt.generate(PROMPT, max_new_tokens=6, ignore_eos=True).text
    proc = console_script("generate", model_dir, "--prompt", "-", "--max-new-tokens", "6",
                          "--ignore-eos", "-v", *OFFLOAD_FLAGS, stdin=PROMPT + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert "INFO offload_rt.runtime: offloading" in proc.stderr
    assert "6 tokens (length)" in proc.stderr and "hit rate" in proc.stderr


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing_model"
    proc = console_script("generate", missing, "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"offload-rt: error: {missing}: model folder does not exist\n"


NO_TORCH_PROBE = """
import contextlib, io, sys
from offload_rt.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(["--help"]), main(["simulate", "--help"]),
             main(["simulate", "--synthetic", "--layers", "2", "--experts", "4", "--tokens", "30",
                   "--policies", "lru,opt", "--capacity", "2", "--json"])]
print(codes, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "accelerate")))
"""


def test_help_and_simulate_do_not_import_torch() -> None:
    """The command line starts in a fraction of a second: torch (seconds to import) loads only
    for commands that run a model; the research kit's simulator never needs it."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0, 0] []"
