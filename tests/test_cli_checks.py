"""What the command line refuses before it loads a model, and the errors that name their flag.

Each refusal here must come before ``offload_rt.load`` (patched to fail the test if called):
text flags that are not UTF-8, seeds outside torch's range, text prompts for a model without a
tokenizer, sampling the model's generation_config.json refuses, output files that cannot be
written, a prompts file that is missing or not UTF-8. Then the errors raised after loading that
must name the flags a user typed (bench's context check, chat's answer budget), and output
writes that fail at the end (``/dev/full``).
"""

from __future__ import annotations

import io
import json
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.chat_input import PipeInput
from offload_rt.cli import main
from offload_rt.cli_generate import prompt_kwargs
from offload_rt.cli_simulate import read_prompts_file

BAD = "\udcff"  # the byte 0xff as Python hands it over from argv (surrogateescape)
NOT_UTF8 = "not valid UTF-8 text: byte 0xff at byte offset 0"
TOO_BIG = 2**64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-token context, the real tokenizer."""
    spec = TinySpec(vocab_size=32000, tokenizer=True, hidden_size=16, intermediate_size=16,
                    num_heads=2, num_kv_heads=1)
    return make_hf_checkpoint(tmp_path_factory.mktemp("checks_model"), spec)


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("no_tokenizer"), TinySpec())


def with_generation_config(base: Path, folder: Path, fields: dict[str, object]) -> Path:
    """A copy of ``base`` whose generation_config.json holds ``fields``."""
    folder.mkdir()
    for item in base.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").write_text(json.dumps(fields))
    return folder


@pytest.fixture()
def no_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(offload_rt, "load", refuse)
    yield


def refused(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """Run the CLI; it must exit 2 with nothing on stdout. Returns stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    return err


# ---- before loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [TOO_BIG, -1])
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_seed_outside_torchs_range(capsys: pytest.CaptureFixture[str], no_load: None,
                                   model_dir: Path, command: str, seed: int) -> None:
    prompt = ("--prompt", "hi") if command == "generate" else ()
    err = refused(capsys, command, model_dir, *prompt, "--seed", seed)
    assert f"offload-rt: error: --seed {seed} is outside 0..{TOO_BIG - 1}" in err


def test_text_flags_must_be_utf8(capsys: pytest.CaptureFixture[str], no_load: None,
                                 model_dir: Path) -> None:
    err = refused(capsys, "generate", model_dir, "--prompt", "hi", "--stop", "ok", "--stop", BAD)
    assert f"offload-rt: error: --stop: {NOT_UTF8}" in err
    err = refused(capsys, "chat", model_dir, "--system", BAD)
    assert f"offload-rt: error: --system: {NOT_UTF8}" in err
    err = refused(capsys, "chat", model_dir, "--stop", BAD)
    assert f"offload-rt: error: --stop: {NOT_UTF8}" in err
    err = refused(capsys, "trace", model_dir, "--prompt", BAD, "-o", "t.jsonl")
    assert f"offload-rt: error: --prompt: {NOT_UTF8}" in err


def test_text_prompts_need_a_tokenizer(capsys: pytest.CaptureFixture[str], no_load: None,
                                       no_tokenizer: Path) -> None:
    err = refused(capsys, "generate", no_tokenizer, "--prompt", "hi")
    assert (f"{no_tokenizer} has no tokenizer (tokenizer.json or tokenizer.model), so --prompt "
            "text cannot be encoded; give the prompt as token ids with --prompt-ids 1,2,3") in err
    err = refused(capsys, "trace", no_tokenizer, "--prompt", "hi", "-o", "t.jsonl")
    assert "--prompt-ids 1,2,3" in err
    err = refused(capsys, "chat", no_tokenizer)
    assert (f"{no_tokenizer} has no tokenizer (tokenizer.json or tokenizer.model), so the lines "
            "of a chat cannot be encoded; offload-rt generate --prompt-ids 1,2,3") in err


def test_sampling_the_file_refuses_names_who_chose_to_sample(
        capsys: pytest.CaptureFixture[str], no_load: None, model_dir: Path,
        tmp_path: Path) -> None:
    folder = with_generation_config(model_dir, tmp_path / "min_p", {"min_p": 0.1})
    err = refused(capsys, "chat", folder)  # chat's own default samples; the file sets no do_sample
    assert (f"{folder}/generation_config.json: min_p 0.1 shapes sampling and offload_rt does "
            "not implement it; chat samples by default (temperature 0.7, its own default for a "
            "model whose generation_config.json sets no do_sample): pass --temperature 0") in err
    err = refused(capsys, "generate", folder, "--prompt", "hi", "--temperature", "0.5")
    assert "; --temperature 0.5 samples: pass --temperature 0 (API: temperature=0)" in err


def test_output_files_are_checked_first(capsys: pytest.CaptureFixture[str], no_load: None,
                                        model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "t.jsonl"
    err = refused(capsys, "generate", model_dir, "--prompt", "hi", "--trace", tmp_path)
    assert f"offload-rt: error: --trace {tmp_path}: is a folder; give a file name in it" in err
    err = refused(capsys, "trace", model_dir, "--prompt", "hi", "-o", missing)
    assert f"--output {missing}: the folder {missing.parent} does not exist" in err
    for flag in ("--save-trace", "--plot"):  # simulate: before the simulation, not after it
        err = refused(capsys, "simulate", "--synthetic", "--tokens", "5", flag, missing)
        assert f"offload-rt: error: {flag} {missing}: the folder {missing.parent} does not " \
               "exist" in err


def test_prompts_file_missing_or_not_utf8(capsys: pytest.CaptureFixture[str], no_load: None,
                                          model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"ok\n\xff bad\n")
    out = tmp_path / "t.jsonl"
    err = refused(capsys, "trace", model_dir, "--prompts-file", bad, "-o", out)
    assert (f"offload-rt: error: --prompts-file {bad}: not valid UTF-8 text: byte 0xff at "
            "byte offset 3 (after 'ok\\n')") in err
    err = refused(capsys, "trace", model_dir, "--prompts-file", tmp_path / "nope.txt", "-o", out)
    assert f"--prompts-file {tmp_path / 'nope.txt'}: cannot read it: No such file" in err
    assert "Traceback" not in err


def test_usage_errors_named_by_argparse(capsys: pytest.CaptureFixture[str], no_load: None,
                                        model_dir: Path, tmp_path: Path) -> None:
    err = refused(capsys, "chat", model_dir, "--history-file", tmp_path / "h",
                  "--no-history-file")
    assert "argument --no-history-file: not allowed with argument --history-file" in err
    err = refused(capsys, "simulate", "--synthetic", "--expert-bytes", "-5")
    assert "argument --expert-bytes: must be >= 1, got -5" in err


# ---- a byte order mark opening the input --------------------------------------------------------


def test_byte_order_mark_is_dropped_from_piped_text(tmp_path: Path) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfhi\n"), encoding="utf-8")
    args = Namespace(prompt="-", prompt_ids=None, chat=False)
    assert prompt_kwargs(args, stdin) == {"prompt": "hi"}
    pipe = PipeInput(io.StringIO("\ufeffhi\n\ufeffho\n"))  # only the one opening the input
    assert [pipe.read(), pipe.read(), pipe.read()] == ["hi\n", "\ufeffho\n", None]
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"\xef\xbb\xbfone\n\ntwo\n")
    assert read_prompts_file(prompts) == ["one", "two"]


# ---- after loading: the flags the user typed are named --------------------------------------------


def test_bench_context_check_names_its_flags(capsys: pytest.CaptureFixture[str],
                                             model_dir: Path) -> None:
    err = refused(capsys, "bench", model_dir, "--prompt-tokens", "250", "--new-tokens", "10",
                  "--repeats", "1")
    assert ("offload-rt: error: --prompt-tokens 250 + --new-tokens 10 = 260 exceeds the context "
            "length (max_seq_len) of 256 (the model's context (max_position_embeddings in "
            f"{model_dir}/config.json)); lower --prompt-tokens or --new-tokens") in err


def test_chat_answer_budget_from_the_file_is_named(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   model_dir: Path, tmp_path: Path) -> None:
    folder = with_generation_config(model_dir, tmp_path / "long", {"max_new_tokens": 300})
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    err = refused(capsys, "chat", folder, "--temperature", "0")
    assert ("max_new_tokens 300 leaves no room for a question in the context of 256 tokens (the "
            f"model's context (max_position_embeddings in {folder}/config.json)); 300 is "
            f"max_new_tokens in {folder}/generation_config.json: pass a smaller one, below 256 "
            "(--max-new-tokens N; API: max_new_tokens=N)") in err


DEV_FULL = Path("/dev/full")  # every write fails with ENOSPC


@pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full (Linux)")
def test_a_write_that_fails_at_the_end_names_the_flag(capsys: pytest.CaptureFixture[str],
                                                      model_dir: Path) -> None:
    code = main(["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "3",
                 "--ignore-eos", "--trace", str(DEV_FULL)])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out.endswith("\n") and len(out) > 1  # the text came first: nothing was lost
    assert ("offload-rt: error: --trace /dev/full: could not write the file: No space left on "
            "device") in err
    err = refused(capsys, "simulate", "--synthetic", "--tokens", "5", "--save-trace", DEV_FULL)
    assert "offload-rt: error: --save-trace /dev/full: could not write the file" in err
