"""``offload-rt chat``: a terminal session, a pipe, and the conversation kept by ``ChatSession``.

Two tests run the installed console script (a pseudo-terminal through pexpect, and a pipe): they
are the only way to see the prompt, the echo and stdout/stderr exactly as a user does. The rest
runs in-process on a runtime with a 64-token context, so trimming happens after a few turns.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.chat import ChatSession
from offload_rt.cli import main
from offload_rt.errors import ContextLengthError
from offload_rt.runtime import Runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT_FLAGS = ("--cache-experts", "2", "--max-new-tokens", "6")
# "[6 tokens (length), 2.1 tok/s, first token 1.400 s; experts: hit rate 26.5% (9 hits, ...]"
SUMMARY = re.compile(r"\[\d+ tokens \(\w+\), [\d.]+ tok/s, first token [\d.]+ s; "
                     r"experts: hit rate [\d.]+% \(\d+ hits, \d+ misses\)[^\]]*\]")
CACHE_STATS = re.compile(r"expert cache: \d+ hits, \d+ misses, hit rate [\d.]+%")
STARTUP_S = 120  # torch import + load on a busy 2-core box
STEP_S = 60
CONTEXT = 64
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny model with the real Mixtral tokenizer; 8 experts so 2 cached slots really offload."""
    spec = TinySpec(vocab_size=32000, tokenizer=True, num_experts=8)
    return make_hf_checkpoint(tmp_path_factory.mktemp("chat_model"), spec)


@pytest.fixture(scope="module")
def short_rt(model_dir: Path) -> Iterator[Runtime]:
    with offload_rt.load(model_dir, max_seq_len=CONTEXT) as rt:
        yield rt


def console_script() -> tuple[str, dict[str, str]]:
    """The installed `offload-rt` and an environment importing this source tree."""
    script = Path(sys.executable).parent / "offload-rt"
    exe = str(script) if script.exists() else shutil.which("offload-rt")
    if exe is None:
        pytest.skip("the offload-rt console script is not installed (pip install -e .)")
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # One intra-op thread: a tiny op otherwise waits ~0.1 s for sleeping OpenMP workers.
    return exe, {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TERM": "dumb"}


# ---- the console script -------------------------------------------------------------------------


def test_terminal_session(model_dir: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    exe, env = console_script()
    child = pexpect.spawn(exe, ["chat", str(model_dir), *CHAT_FLAGS, "--seed", "0"], env=env,
                          encoding="utf-8", timeout=STEP_S, dimensions=(24, 300))
    try:
        child.expect_exact("commands: /reset", timeout=STARTUP_S)  # the banner
        child.expect_exact("> ")
        child.sendline("hello")
        child.expect_exact("hello")  # the terminal's echo
        child.expect(SUMMARY)
        assert child.before.strip(), "no answer was printed before the summary line"
        assert "hit rate" in child.after and "tok/s" in child.after
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"answers: 1, tokens: \d+")
        child.expect(CACHE_STATS)
        child.expect_exact("> ")
        child.sendline("/help")
        child.expect_exact("commands: /reset")
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
    finally:
        if child.isalive():  # a hang fails the test (pexpect.TIMEOUT) and leaves no process
            child.terminate(force=True)


def test_piped_stdin(model_dir: Path, short_rt: Runtime) -> None:
    exe, env = console_script()
    proc = subprocess.run([exe, "chat", str(model_dir), *CHAT_FLAGS, "--temperature", "0"],
                          input="hello\n/stats\n/exit\n", capture_output=True, text=True,
                          env=env, timeout=STARTUP_S, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = "".join(ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY).reply("hello"))
    assert expected.strip()
    assert proc.stdout.startswith(expected + "\n"), proc.stdout  # no "> " prompt on a pipe
    stats = proc.stdout[len(expected) + 1:]
    assert f"answers: 1, tokens: {len(short_rt.last_result.token_ids)}" in stats
    assert CACHE_STATS.search(stats), stats
    assert len(SUMMARY.findall(proc.stderr)) == 1, proc.stderr
    assert "commands:" not in proc.stderr  # the banner is for terminals only


# ---- the CLI loop in-process (stdin replaced) ---------------------------------------------------


def chat_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                    model_dir: Path, stdin: str, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", str(model_dir), "--temperature", "0", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_reset_forgets_the_conversation(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str],
                                        model_dir: Path) -> None:
    code, out, err = chat_in_process(monkeypatch, capsys, model_dir,
                                     "hello\n/reset\nhello\n", "--max-new-tokens", "6")
    assert code == 0, err
    first, cleared, rest = out.partition("\n(conversation cleared)\n")
    assert cleared, out
    assert rest == first + "\n"  # greedy, same empty history: the same answer again


def test_too_long_question_is_refused_and_the_chat_goes_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        model_dir: Path, short_rt: Runtime) -> None:
    long_question = "word " * 80
    code, out, err = chat_in_process(monkeypatch, capsys, model_dir, f"{long_question}\nhello\n",
                                     "--max-new-tokens", "6", "--max-seq-len", str(CONTEXT))
    assert code == 0, err
    assert "(not answered: the question alone needs more than 58 tokens" in err
    expected = "".join(ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY).reply("hello"))
    assert out == expected + "\n"  # answered as a first question: the long one left no trace


def test_answer_budget_larger_than_the_context_fails_at_start(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        model_dir: Path) -> None:
    code, out, err = chat_in_process(monkeypatch, capsys, model_dir, "hello\n",
                                     "--max-seq-len", str(CONTEXT))  # default 200 new tokens
    assert code == 2
    assert out == ""
    assert "max_new_tokens 200 leaves no room for a question in the context of 64" in err


# ---- ChatSession ---------------------------------------------------------------------------------


def test_history_alternates_and_is_sent_with_each_question(short_rt: Runtime) -> None:
    session = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY)
    first = "".join(session.reply("hi"))
    second = "".join(session.reply("bye"))
    assert [t["role"] for t in session.history] == ["user", "assistant", "user", "assistant"]
    assert [t["content"] for t in session.history] == [
        "hi", first.strip() or " ", "bye", second.strip() or " "]
    assert short_rt.last_prompt_ids == short_rt.encode(messages=session.history[:3])
    session.reset()
    assert session.history == []
    assert "".join(session.reply("hi")) == first


def test_long_conversation_drops_the_oldest_exchanges(short_rt: Runtime) -> None:
    session = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY)
    transcript: list[dict[str, str]] = []
    for i in range(8):
        question = f"Tell me something about the number {i}, please."
        answer = "".join(session.reply(question))
        transcript += [{"role": "user", "content": question},
                       {"role": "assistant", "content": answer.strip() or " "}]
        assert len(short_rt.last_prompt_ids) + 6 <= CONTEXT
    kept = len(session.history)
    assert 2 <= kept < len(transcript)  # trimmed, yet the latest exchange is there
    assert session.history == transcript[-kept:]  # the oldest went, in whole exchanges
    assert session.history[0]["role"] == "user"
    one_more = transcript[-kept - 2:-1]  # the sent turns plus the next-oldest exchange
    assert len(short_rt.encode(messages=one_more)) > CONTEXT - 6  # dropped only what it had to


def test_question_longer_than_the_context_raises(short_rt: Runtime) -> None:
    session = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY)
    "".join(session.reply("hi"))
    before = list(session.history)
    with pytest.raises(ContextLengthError,
                       match=r"the question alone needs more than 58 tokens \(context 64 minus "
                             r"6 for the answer\)"):
        "".join(session.reply("word " * 80))
    assert session.history == before


def test_answer_budget_must_leave_room_for_a_question(short_rt: Runtime) -> None:
    with pytest.raises(ContextLengthError, match="max_new_tokens 64 leaves no room"):
        ChatSession(short_rt, max_new_tokens=CONTEXT)


def test_trimming_calls_on_trim_with_the_exchanges_dropped(short_rt: Runtime) -> None:
    dropped: list[int] = []
    session = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY, on_trim=dropped.append)
    for i in range(8):
        "".join(session.reply(f"Tell me something about the number {i}, please."))
        assert sum(dropped) == i + 1 - len(session.history) // 2  # every drop was reported
    assert dropped and all(n >= 1 for n in dropped)


def test_cancelled_answer_is_left_out_of_the_history(short_rt: Runtime) -> None:
    session = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY)
    first = "".join(session.reply("hi"))
    before = list(session.history)
    pieces = []
    for piece in session.reply("bye"):
        pieces.append(piece)
        short_rt.cancel()  # as Ctrl-C does: the runtime stops before its next token
    assert len(pieces) == 1 and short_rt.last_result.finish_reason == "cancelled"
    assert session.history == before
    fresh = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY)
    assert ["".join(fresh.reply(q)) for q in ("hi", "bye")] == [first, "".join(session.reply("bye"))]


# ---- the CLI loop: commands, notices, refused lines ---------------------------------------------


def test_unknown_command_says_so_and_double_slash_sends_a_question(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        model_dir: Path, short_rt: Runtime) -> None:
    code, out, err = chat_in_process(monkeypatch, capsys, model_dir, "/foo bar\n//hello\n",
                                     "--max-new-tokens", "6")
    assert code == 0, err
    expected = "".join(ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY).reply("/hello"))
    assert out == ("unknown command /foo; commands: /reset (forget the conversation), /stats, "
                   f"/help, /exit\n{expected}\n")


def test_context_full_notice_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], model_dir: Path,
                                       short_rt: Runtime) -> None:
    questions = [f"Tell me something about the number {i}, please." for i in range(8)]
    dropped: list[int] = []
    session = ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY, on_trim=dropped.append)
    for q in questions:
        "".join(session.reply(q))
    code, _, err = chat_in_process(monkeypatch, capsys, model_dir, "\n".join(questions) + "\n",
                                   "--max-new-tokens", "6", "--max-seq-len", str(CONTEXT))
    assert code == 0, err
    notices = re.findall(r"\(context full: dropped the (?:(\d+) )?oldest exchanges?\)", err)
    assert [int(n or 1) for n in notices] == dropped  # once per trimming, with its count
    assert dropped


def test_invalid_utf8_line_is_refused_and_the_chat_goes_on(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        model_dir: Path, short_rt: Runtime) -> None:
    bad = b"caf\xe9\n".decode("utf-8", "surrogateescape")  # latin-1 bytes, as stdin decodes them
    code, out, err = chat_in_process(monkeypatch, capsys, model_dir, f"{bad}hello\n",
                                     "--max-new-tokens", "6")
    assert code == 0, err
    assert "(not sent: line 1 of stdin: not valid UTF-8 text: byte 0xe9 at byte offset 3" in err
    expected = "".join(ChatSession(short_rt, max_new_tokens=6, sampling=GREEDY).reply("hello"))
    assert out == expected + "\n"
