"""Prompt text at the edges: invalid UTF-8 is refused with an OptionError naming where it came
from and the byte offset (stdin, argv, API strings), never a pybind11 traceback; a raw prompt
that spells chat markers as text gets a warning pointing to --chat."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint, mixtral_tokenizer_path

import offload_rt
from offload_rt.cli_generate import prompt_kwargs
from offload_rt.errors import OptionError
from offload_rt.runtime import Runtime
from offload_rt.text_input import check_text, decode_text
from offload_rt.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_BYTES = b"abc\xff\xfe def\n"  # the example
CHAT_PROMPT = "<s>[INST] What is 2+2? [/INST]"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=32000, tokenizer=True, hidden_size=16, intermediate_size=16,
                    num_heads=2, num_kv_heads=1)
    return make_hf_checkpoint(tmp_path_factory.mktemp("prompt_model"), spec)


@pytest.fixture(scope="module")
def rt(model_dir: Path) -> Iterator[Runtime]:
    with offload_rt.load(model_dir) as runtime:
        yield runtime


def offload_rt_cli(*argv: str | bytes | Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The console script with byte arguments and byte stdin, as a shell passes them."""
    script = Path(sys.executable).parent / "offload-rt"
    if not script.exists():
        pytest.skip("the offload-rt console script is not installed (pip install -e .)")
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([script, *argv], input=stdin, capture_output=True, env=env,
                          timeout=120, check=False)


# ---- invalid UTF-8 ------------------------------------------------------------------------------


def test_stdin_with_invalid_utf8_exits_2() -> None:
    proc = offload_rt_cli("generate", "--prompt", "-", stdin=BAD_BYTES)  # the demo model
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b""
    assert err == ("offload-rt: error: --prompt - (stdin): not valid UTF-8 text: byte 0xff at "
                   "byte offset 3 (after 'abc'); save the text as UTF-8 (e.g. iconv -f latin1 "
                   "-t utf-8)\n")


def test_argv_with_invalid_utf8_exits_2(model_dir: Path) -> None:
    proc = offload_rt_cli("generate", model_dir, "--prompt", os.fsencode("x") + BAD_BYTES[:-1])
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.startswith("offload-rt: error: --prompt: not valid UTF-8 text: byte 0xff at byte "
                          "offset 4 (after 'xabc')")


@pytest.mark.parametrize("locale_errors", ["strict", "surrogateescape"])
def test_stdin_is_decoded_strictly_whatever_the_locale_handler(locale_errors: str) -> None:
    args = Namespace(prompt="-", prompt_ids=None, chat=False)
    stdin = io.TextIOWrapper(io.BytesIO("é ".encode() + BAD_BYTES), encoding="utf-8",
                             errors=locale_errors)
    with pytest.raises(OptionError, match=r"\(stdin\): .* byte 0xff at byte offset 6 "):
        prompt_kwargs(args, stdin)


def test_stdin_keeps_text_mode_newlines() -> None:
    args = Namespace(prompt="-", prompt_ids=None, chat=False)
    stdin = io.TextIOWrapper(io.BytesIO(b"What is\r\n2+2?\r\n"), encoding="utf-8")
    assert prompt_kwargs(args, stdin) == {"prompt": "What is\n2+2?"}


def test_api_prompt_with_lone_surrogates(rt: Runtime) -> None:
    with pytest.raises(OptionError, match=r"^prompt: .* byte 0xff at byte offset 1 "):
        rt.generate("a\udcff", max_new_tokens=1)
    messages = [{"role": "user", "content": "é\ud800"}]
    with pytest.raises(OptionError, match=r"^messages\[0\] content: .* lone surrogate U\+D800 "
                                          r"at byte offset 2 "):
        rt.generate(messages=messages, max_new_tokens=1)
    assert rt.generate("a", max_new_tokens=1).token_ids  # still usable


def test_api_prompt_of_bytes_or_non_ints_is_an_option_error(rt: Runtime) -> None:
    with pytest.raises(OptionError, match="prompt is bytes"):
        rt.generate(b"abc", max_new_tokens=1)  # not the ids 97, 98, 99
    with pytest.raises(OptionError, match="sequence of int token ids"):
        rt.generate([1, "a"], max_new_tokens=1)


def test_tokenizer_never_leaks_the_pybind11_error() -> None:
    tok = Tokenizer.from_file(mixtral_tokenizer_path())
    with pytest.raises(OptionError, match="text to encode: .* byte 0xfe at byte offset 0"):
        tok.encode("\udcfe")


def test_check_text_and_decode_text() -> None:
    assert check_text("héllo €", "x") == "héllo €"
    assert decode_text("héllo €".encode(), "x") == "héllo €"
    with pytest.raises(OptionError, match=r"^chat input: .* byte 0xe9 at byte offset 5 "):
        decode_text(b"caf\xc3\xa9\xe9", "chat input")
    with pytest.raises(OptionError, match="not valid cp1252 text: byte 0x81 at byte offset 2"):
        decode_text(b"ab\x81", "x", "cp1252")  # a locale's other encoding is named as such


# ---- control pieces spelled as text -------------------------------------------------------------


def test_cli_warns_when_a_raw_prompt_spells_chat_markers(model_dir: Path) -> None:
    proc = offload_rt_cli("generate", model_dir, "--prompt", CHAT_PROMPT, "--max-new-tokens", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    warning = next(line for line in err.splitlines() if "plain text" in line)
    assert "<s>, [INST], [/INST]" in warning and "--chat" in warning
    assert "--prompt-ids" in warning


def test_plain_and_chat_prompts_get_no_warning(rt: Runtime,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="offload_rt"):
        rt.encode("What is 2+2?")
        rt.encode(messages=[{"role": "user", "content": "What is 2+2?"}])
        assert not caplog.records
        rt.encode("</s>")
    assert len(caplog.records) == 1 and "</s>" in caplog.records[0].getMessage()
