"""``offload-rt chat`` at a terminal: line editing, history, Ctrl-C / Ctrl-D, unknown commands and
lines that are not valid UTF-8, through a pseudo-terminal (pexpect) as a user types them.

What reaches the model is observed through its answers: the runs are greedy, so the console
script's answer must equal ``ChatSession.reply`` of the expected question in-process (the offloaded
CLI and the resident runtime give the same tokens), and the tests first check that the line a
broken editor would send gets a different answer. Each session writes its history under a
temporary ``XDG_STATE_HOME``, never to the real home.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint
from test_chat_cli import CHAT_FLAGS, GREEDY, STARTUP_S, STEP_S, SUMMARY, console_script

import offload_rt
from offload_rt.chat import ChatSession
from offload_rt.chat_input import default_history_file
from offload_rt.runtime import Runtime

pexpect = pytest.importorskip("pexpect")

LEFT, UP = "\x1b[D", "\x1b[A"  # what a terminal sends for the arrow keys (ANSI)
LONG_ANSWER = 500  # tokens: seconds of decoding, so Ctrl-C surely lands inside the answer
BAD_LINE = b"a\xffb"  # 0xff never occurs in UTF-8
# text_input.check_text's message, from where the line came to the byte that is wrong
REFUSED = r"\(not sent: {}: not valid UTF-8 text: byte 0xff at byte offset 1\b"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny model, real Mixtral tokenizer, a 1024-token context for one long answer."""
    spec = TinySpec(vocab_size=32000, tokenizer=True, num_experts=8,
                    max_position_embeddings=1024)
    return make_hf_checkpoint(tmp_path_factory.mktemp("chat_terminal_model"), spec)


@pytest.fixture(scope="module")
def rt(model_dir: Path) -> Iterator[Runtime]:
    with offload_rt.load(model_dir) as runtime:
        yield runtime


def answers(rt: Runtime, *questions: str, max_new_tokens: int = 6, **sampling: Any) -> list[str]:
    """The greedy answers of one fresh conversation, in-process."""
    session = ChatSession(rt, max_new_tokens=max_new_tokens, sampling={**GREEDY, **sampling})
    return ["".join(session.reply(q)) for q in questions]


def spawn(model_dir: Path, state: Path, *flags: str) -> Any:
    exe, env = console_script()
    child = pexpect.spawn(exe, ["chat", str(model_dir), "--temperature", "0", *flags],
                          env={**env, "XDG_STATE_HOME": str(state)}, encoding="utf-8",
                          codec_errors="replace", timeout=STEP_S, dimensions=(24, 300))
    child.expect_exact("commands: /reset", timeout=STARTUP_S)  # the banner
    child.expect_exact("> ")
    return child


def answer_shown(child: Any) -> str:
    """The text between the typed line and the summary line, as the user saw it."""
    child.expect(SUMMARY)
    return child.before.replace("\r\n", "\n")


def end(child: Any) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture()
def cleanup() -> Iterator[list[Any]]:
    children: list[Any] = []
    yield children
    for child in children:  # a hang fails the test (pexpect.TIMEOUT) and leaves no process
        if child.isalive():
            child.terminate(force=True)


def test_arrow_keys_edit_the_line_and_recall_history(model_dir: Path, rt: Runtime, state: Path,
                                                      cleanup: list[Any]) -> None:
    first, again = answers(rt, "hello", "hello")
    assert answers(rt, f"helo{LEFT}l") != [first]  # a raw escape sequence would be seen
    assert answers(rt, "hello", UP)[1] != again
    child = spawn(model_dir, state, *CHAT_FLAGS)
    cleanup.append(child)
    child.send("helo")
    child.expect_exact("helo")  # typed before the arrow: readline has read it
    child.send(f"{LEFT}l\r")
    assert answer_shown(child).endswith(f"\n{first}\n")
    child.expect_exact("> ")
    child.send(f"{UP}\r")  # the previous line again, asked a second time
    assert answer_shown(child).endswith(f"\n{again}\n")
    child.expect_exact("> ")
    child.sendline("/exit")
    end(child)
    history = state / "offload_rt" / "chat_history"
    assert history.read_text().split("\n")[:3] == ["hello", "/exit", ""]  # one "hello": no dups
    assert stat.S_IMODE(history.stat().st_mode) == 0o600

    child = spawn(model_dir, state, *CHAT_FLAGS)  # a new session recalls the saved lines
    cleanup.append(child)
    child.send(f"{UP}{UP}\r")
    assert answer_shown(child).endswith(f"\n{first}\n")
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D at an empty prompt: a newline, exit status 0
    end(child)
    assert child.before == "\r\n"


def test_ctrl_c_stops_the_answer_then_ends_the_session(model_dir: Path, rt: Runtime,
                                                        state: Path, cleanup: list[Any]) -> None:
    [full] = answers(rt, "hello", max_new_tokens=LONG_ANSWER, ignore_eos=True)
    child = spawn(model_dir, state, "--cache-experts", "2", "--max-new-tokens", str(LONG_ANSWER),
                  "--ignore-eos")
    cleanup.append(child)
    child.send("hello\r")
    child.expect(r"hello\r\n.")  # the answer has begun
    child.sendintr()
    child.expect_exact("(answer stopped; left out of the conversation)")
    child.expect(r"\[(\d+) tokens \(cancelled\)")
    assert int(child.match.group(1)) < LONG_ANSWER
    child.expect_exact("> ")
    child.send("hello\r")  # answered in full, as a first question: the stopped one left no trace
    assert answer_shown(child).endswith(f"\n{full}\n")
    assert f"[{LONG_ANSWER} tokens (length)" in child.after
    child.expect_exact("> ")
    child.send("abc")
    child.expect_exact("abc")
    child.sendintr()  # Ctrl-C on a typed line: the line is dropped, a fresh prompt
    child.expect_exact("> ")
    assert child.before == "\r\n"
    child.sendintr()  # Ctrl-C at an empty prompt: a newline, exit status 0
    end(child)
    assert child.before == "\r\n"


def test_unknown_command_and_invalid_utf8_line_at_the_terminal(
        model_dir: Path, rt: Runtime, state: Path, cleanup: list[Any]) -> None:
    [hello] = answers(rt, "hello")
    child = spawn(model_dir, state, *CHAT_FLAGS)
    cleanup.append(child)
    child.sendline("/foo")
    child.expect_exact("unknown command /foo; commands: /reset (forget the conversation), "
                       "/stats, /help, /exit")
    child.expect_exact("> ")
    os.write(child.child_fd, BAD_LINE + b"\r")  # raw bytes: pexpect would encode a str
    child.expect(REFUSED.format("this line"))
    child.expect_exact("> ")
    child.send("hello\r")  # the session goes on; the refused line left no trace
    assert answer_shown(child).endswith(f"\n{hello}\n")
    child.expect_exact("> ")
    child.sendline("/exit")
    end(child)


@pytest.mark.parametrize("stdin_errors", ["default", "strict"])
def test_invalid_utf8_line_in_a_pipe_is_refused(model_dir: Path, rt: Runtime,
                                                stdin_errors: str) -> None:
    """Python's default handler for stdin is locale-dependent (surrogateescape under C/POSIX
    locales, strict elsewhere); the chat reads leniently and refuses the line either way."""
    exe, env = console_script()
    if stdin_errors == "strict":
        env["PYTHONIOENCODING"] = "utf-8:strict"
    proc = subprocess.run([exe, "chat", str(model_dir), *CHAT_FLAGS, "--temperature", "0"],
                          input=BAD_LINE + b"\nhello\n", capture_output=True, env=env,
                          timeout=STARTUP_S, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert re.search(REFUSED.format("line 1 of stdin"), err), err
    assert "Traceback" not in err
    [hello] = answers(rt, "hello")
    assert proc.stdout.decode() == hello + "\n"


# ---- chat_input helpers -------------------------------------------------------------------------


def test_history_file_follows_xdg_state_home(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_history_file() == tmp_path / "offload_rt" / "chat_history"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # invalid per the spec: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_history_file() == tmp_path / "home/.local/state/offload_rt/chat_history"


def test_no_history_file_writes_nothing(model_dir: Path, tmp_path: Path,
                                        cleanup: list[Any]) -> None:
    # (--history-file with --no-history-file is now a usage error: tests/test_cli_checks.py)
    child = spawn(model_dir, tmp_path / "state", *CHAT_FLAGS, "--no-history-file")
    cleanup.append(child)
    child.sendline("/help")
    child.expect_exact("Ctrl-C stops an answer")
    child.expect_exact("> ")
    child.sendline("/exit")
    end(child)
    assert not (tmp_path / "state").exists()


def test_history_file_flag_chooses_the_file(model_dir: Path, tmp_path: Path,
                                            cleanup: list[Any]) -> None:
    history = tmp_path / "h" / "chat_history"
    child = spawn(model_dir, tmp_path / "state", *CHAT_FLAGS, "--history-file", str(history))
    cleanup.append(child)
    child.sendline("/stats")
    child.expect(re.escape("answers: 0"))
    child.expect_exact("> ")
    child.sendline("/exit")
    end(child)
    assert history.read_text() == "/stats\n/exit\n"
    assert not (tmp_path / "state").exists()
