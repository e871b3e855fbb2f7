"""Streaming text to the terminal: pieces written as they come, a line ended before an error, and
Ctrl-C turned into a cancel between tokens (``generate`` and ``chat``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import IO, TYPE_CHECKING

from offload_rt.errors import OffloadError

if TYPE_CHECKING:  # the runtime imports torch: only when a command runs a model
    from offload_rt.runtime import Runtime

# the --help epilog of offload-rt, generate and chat (raw text: argparse keeps the lines)
EXIT_STATUS = """exit status:
  0    success
  1    stdout was closed before the output ended (e.g. piped into head); nothing is printed
  2    a usage error, or an error printed as "offload-rt: error: ..."
  130  interrupted (Ctrl-C); generate --json still prints the object of what was generated"""


def stream_pieces(pieces: Iterable[str], out: IO[str]) -> None:
    """Write each piece to ``out`` and flush, then end the line.

    When an ``OffloadError`` stops the stream after some text (a policy error, non-finite
    logits), the line is ended before the error propagates, so the CLI's ``offload-rt: error:
    ...`` starts on a line of its own, not after the last word. A ``KeyboardInterrupt`` leaves
    the text as it is (the CLI's "interrupted" note begins with a newline on stderr).
    """
    pending = False  # text written since the last newline
    try:
        for piece in pieces:
            if piece:
                out.write(piece)
                out.flush()
                pending = not piece.endswith("\n")
    except OffloadError:
        if pending:
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()


@contextlib.contextmanager
def ctrl_c_cancels(rt: Runtime) -> Iterator[None]:
    """Meanwhile Ctrl-C (SIGINT) asks ``rt`` to stop before its next token instead of raising
    KeyboardInterrupt mid-step, so the engine is never left half-way through a forward pass; a
    second Ctrl-C raises KeyboardInterrupt (the session ends, exit status 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    pressed = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()
        rt.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
