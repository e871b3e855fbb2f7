"""Typed bytes that are not UTF-8 at ``offload-rt chat``'s terminal: refused whole, never changed.

GNU readline held a byte that begins a multibyte sequence (a Latin-1 terminal's ``é`` is 0xe9)
while ASCII went on: ``caf\\xe9 ok`` was sent as ``caf ok``, ``caf\\xe9`` as ``caf``, and the held
byte surfaced in the next line, so a valid ``naïve café ☕`` was then refused. These sessions
type the exact bytes through a pseudo-terminal; what reached the model is seen through greedy
answers, as in ``test_chat_terminal.py``. ``TypedBytes`` (the guard's decoder) is also checked
against Python's own UTF-8 decoder on arbitrary bytes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from checkpoint_factory import TinySpec, make_hf_checkpoint
from hypothesis import assume, given
from hypothesis import strategies as st
from test_chat_cli import CHAT_FLAGS, GREEDY, STARTUP_S, STEP_S, SUMMARY, console_script

import offload_rt
from offload_rt.chat import ChatSession
from offload_rt.readline_guard import GuardedLine, TypedBytes
from offload_rt.runtime import Runtime

pexpect = pytest.importorskip("pexpect")

VALID = "naïve café ☕"  # two-byte and three-byte characters
# (bytes typed, the bad byte, the valid text before it): the tester's sequences
TYPED = [(b"caf\xe9 ok\r", 0xE9, "caf"), (b"caf\xe9\r", 0xE9, "caf"), (b"abc\xc3\r", 0xC3, "abc")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=32000, tokenizer=True, num_experts=8)
    return make_hf_checkpoint(tmp_path_factory.mktemp("typed_bytes_model"), spec)


@pytest.fixture(scope="module")
def rt(model_dir: Path) -> Iterator[Runtime]:
    with offload_rt.load(model_dir) as runtime:
        yield runtime


def answer(rt: Runtime, question: str) -> str:
    """The greedy first answer to ``question``, in-process."""
    return "".join(ChatSession(rt, max_new_tokens=6, sampling=GREEDY).reply(question))


@pytest.fixture()
def session(model_dir: Path, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A chat at a pseudo-terminal and its history file; the child never outlives the test."""
    exe, env = console_script()
    state = tmp_path / "state"
    child = pexpect.spawn(exe, ["chat", str(model_dir), "--temperature", "0", *CHAT_FLAGS],
                          env={**env, "XDG_STATE_HOME": str(state)}, encoding="utf-8",
                          codec_errors="replace", timeout=STEP_S, dimensions=(24, 300))
    try:
        child.expect_exact("commands: /reset", timeout=STARTUP_S)
        child.expect_exact("> ")
        yield child, state / "offload_rt" / "chat_history"
    finally:
        if child.isalive():
            child.terminate(force=True)


def ask_valid_line(child: Any, expected: str) -> None:
    """Type VALID; its answer must be the in-process answer to VALID (nothing carried over)."""
    child.send(VALID + "\r")
    child.expect(SUMMARY)
    assert child.before.replace("\r\n", "\n").endswith(f"\n{expected}\n"), child.before
    child.expect_exact("> ")


def end_session(child: Any) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.parametrize(("typed", "byte", "before"), TYPED)
def test_typed_line_with_a_bad_byte_is_refused_whole(session: tuple[Any, Path], rt: Runtime,
                                                     typed: bytes, byte: int,
                                                     before: str) -> None:
    child, history = session
    valid = answer(rt, VALID)
    os.write(child.child_fd, typed)  # raw bytes: pexpect would encode a str
    child.expect(re.escape(f"(not sent: this line: not valid UTF-8 text: byte 0x{byte:02x} at "
                           f"byte offset {len(before)} (after {before!r})"))
    child.expect_exact("> ")
    ask_valid_line(child, valid)  # before: refused, "byte 0xe9 at byte offset 2 (after 'na')"
    end_session(child)
    assert history.read_text(encoding="utf-8").splitlines() == [VALID, "/exit"]


def test_ctrl_c_while_a_lead_byte_waits_drops_the_line(session: tuple[Any, Path],
                                                      rt: Runtime) -> None:
    child, history = session
    valid = answer(rt, VALID)
    child.send("caf")
    child.expect_exact("caf")
    os.write(child.child_fd, b"\xe9")  # a lead byte, nothing after it yet: it waits
    time.sleep(1)  # for the chat to read it (no echo to wait for: nothing is shown yet)
    child.sendintr()  # Ctrl-C on a typed line: dropped, a fresh prompt
    child.expect_exact("> ")
    ask_valid_line(child, valid)  # the waiting byte did not reach this line
    end_session(child)
    assert history.read_text(encoding="utf-8").splitlines() == [VALID, "/exit"]


# ---- the guard's decoder, against Python's ------------------------------------------------------

TEXT_WITH_JUNK = st.lists(st.one_of(st.text(max_size=4).map(str.encode), st.binary(max_size=3)),
                          max_size=8).map(b"".join)


def shown_and_bad(data: bytes) -> tuple[str, list[int]]:
    """What readline would get for ``data`` typed (decoded) and the bytes recorded as bad."""
    feed = iter(data)
    typed = TypedBytes(lambda: next(feed, -1))
    out: list[int] = []
    while (chunk := typed.next_bytes()) != [-1]:
        out += chunk
    return bytes(out).decode("utf-8"), typed.bad_bytes  # strict: it is always valid UTF-8


@given(st.one_of(st.binary(max_size=24), TEXT_WITH_JUNK))
def test_typed_bytes_agree_with_pythons_decoder(data: bytes) -> None:
    assume("\ufffd".encode() not in data)  # a typed U+FFFD and a marker look alike
    shown, bad = shown_and_bad(data)
    expected = data.decode("utf-8", "surrogateescape")  # what a pipe gives the chat
    assert GuardedLine(bad, interrupted=False).text(shown) == expected


def test_each_bad_byte_shows_as_one_marker() -> None:
    assert shown_and_bad(b"caf\xe9 ok") == ("caf\ufffd ok", [0xE9])
    assert shown_and_bad(b"abc\xed\xa0\x80 x") == ("abc\ufffd\ufffd\ufffd x", [0xED, 0xA0, 0x80])
    assert shown_and_bad(VALID.encode()) == (VALID, [])
