"""Streamed output when a run ends badly: an error after partial text starts a line of its own,
``generate --json`` still prints its object when Ctrl-C (a real SIGINT) stops it, and a closed
stdout gives the exit status ``--help`` documents, for generate and chat alike."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fault_injection as fi
import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.cli import main
from offload_rt.cli_stream import stream_pieces
from offload_rt.errors import NumericalError

REPO_ROOT = Path(__file__).resolve().parents[1]
FAILING = ("--policy", "fault_injection:RaisingPolicy", "--cache-experts", "2", "--prefetch", "0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(num_experts=8, num_layers=3, vocab_size=32000, tokenizer=True, seed=62,
                    max_position_embeddings=1024)
    return make_hf_checkpoint(tmp_path_factory.mktemp("stream_model"), spec)


@pytest.fixture()
def armed() -> Iterator[None]:
    fi.arm("choose_victim", nth=40)  # some tokens in: the text so far has no newline
    yield
    fi.disarm()


def failing_pieces(*pieces: str) -> Iterator[str]:
    yield from pieces
    raise NumericalError("non-finite logits")


def test_an_error_after_partial_text_ends_its_line() -> None:
    cases = {("the time, ", "the"): "the time, the\n",  # before: "the time, the" + the error
             ("a line\n",): "a line\n", (): ""}  # a line already ended, or none begun
    for pieces, shown in cases.items():
        out = io.StringIO()
        with pytest.raises(NumericalError):
            stream_pieces(failing_pieces(*pieces), out)
        assert out.getvalue() == shown


def test_generate_error_starts_a_line_of_its_own(capsys: pytest.CaptureFixture[str],
                                                 model_dir: Path, armed: None) -> None:
    code = main(["generate", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "60",
                 "--ignore-eos", *FAILING])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out.strip() and out.endswith("\n")  # before: "...the time, theoffload-rt: error"
    assert err.startswith("offload-rt: error: cache policy 'raising-lru'")


def test_chat_error_starts_a_line_of_its_own(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch, model_dir: Path,
                                             armed: None) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    code = main(["chat", str(model_dir), "--temperature", "0", "--max-new-tokens", "60",
                 "--ignore-eos", *FAILING])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out.strip() and out.endswith("\n")
    assert err.startswith("offload-rt: error: cache policy 'raising-lru'")


# ---- subprocesses: a real SIGINT, a closed stdout ----------------------------------------------

# The CLI, with a marker on stderr once 5 tokens are sampled and a short pause per token, so
# the test's SIGINT surely lands during the generation (the signal itself is real).
SLOW_CLI = """
import itertools, sys, time
from offload_rt import sampling
from offload_rt.cli import main

real_sample = sampling.Sampler.sample
count = itertools.count(1)

def sample(self, logits):
    token = real_sample(self, logits)
    if next(count) == 5:
        print("TOKENS", file=sys.stderr, flush=True)
    time.sleep(0.02)
    return token

sampling.Sampler.sample = sample
sys.exit(main(sys.argv[1:]))
"""


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_json_output_survives_ctrl_c(model_dir: Path) -> None:
    argv = ["generate", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "900",
            "--ignore-eos", "--temperature", "0", "--json"]
    with offload_rt.load(model_dir) as rt:
        full = rt.generate("Hello there", max_new_tokens=900, ignore_eos=True, temperature=0)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("TOKENS"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.endswith("offload-rt: interrupted\n") and "Traceback" not in err
    obj = json.loads(out)  # before: stdout was empty
    assert obj["finish_reason"] == "interrupted"
    assert obj["prompt_token_ids"] == full.prompt_token_ids
    assert 0 < len(obj["token_ids"]) < len(full.token_ids)
    assert obj["token_ids"] == full.token_ids[:len(obj["token_ids"])]
    assert full.text.startswith(obj["text"]) and "tokens_per_s" in obj["stats"]


def closed_stdout(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the CLI with a stdout whose reader closes after 5 bytes (``| head -c 5``)."""
    proc = subprocess.Popen([sys.executable, "-m", "offload_rt.cli", *argv],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdout.read(5)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, "", err)


def test_closed_stdout_exits_1_quietly_as_help_says(capsys: pytest.CaptureFixture[str],
                                                    model_dir: Path) -> None:
    assert main(["--help"]) == 0
    assert "1    stdout was closed before the output ended" in capsys.readouterr().out
    long = ["--max-new-tokens", "400", "--ignore-eos", "--temperature", "0"]
    for argv, stdin in ((["generate", str(model_dir), "--prompt", "Hello there", *long], ""),
                        (["chat", str(model_dir), *long], "Hello there\nAnd then?\n")):
        done = closed_stdout(argv, stdin)
        assert (done.returncode, done.stderr) == (1, ""), done.stderr
