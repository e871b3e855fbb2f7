"""Where ``offload-rt chat`` reads its lines: a terminal with line editing, or a pipe.

On a terminal the standard library's ``readline`` module (GNU readline, or libedit where Python
was built with it) gives ``input()`` line editing (arrows, Home/End, Ctrl-A/E/K/U/W), history
(Up/Down, Ctrl-R) and a history file; it is imported only for a terminal session. A pipe is read
line by line, as before, with no prompt.

Both read stdin with the ``surrogateescape`` error handler (PEP 383), so a byte that does not
decode never raises mid-read (losing the lines around it): it arrives as a lone surrogate
U+DC80..U+DCFF, which ``offload_rt.text_input.check_text`` then refuses, line by line. At a
terminal GNU readline would drop or move such a byte before Python sees it;
``offload_rt.readline_guard`` reads the typed bytes first, so a line with one arrives whole. A
refused line (one with such a byte) is left out of the history: recalled, it would read as its
U+FFFD markers, valid text nobody typed. One byte order mark opening piped input is dropped.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import IO

from offload_rt.readline_guard import ReadlineGuard
from offload_rt.readline_guard import install as install_guard
from offload_rt.text_input import BOM

log = logging.getLogger(__name__)
HISTORY_LENGTH = 1000  # lines kept in the history file
PROMPT = "> "


def default_history_file() -> Path:
    """``$XDG_STATE_HOME/offload_rt/chat_history``, else ``~/.local/state/offload_rt/...``.

    The XDG Base Directory specification: ``XDG_STATE_HOME`` holds state that should persist
    between restarts (history is its example); a relative value is invalid and ignored.
    """
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "offload_rt" / "chat_history"


class PipeInput:
    """Lines from a pipe or file: no prompt, no editing; None at the end of the input. A byte
    order mark (U+FEFF) opening the input is dropped (editors save "UTF-8 with BOM")."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._first = True

    def read(self) -> str | None:
        line = self.stream.readline()
        if self._first:
            self._first, line = False, line.removeprefix(BOM)
        return line if line else None


class TerminalInput:
    """Lines typed at a terminal, with ``readline`` editing and history when available.

    ``read`` returns None for Ctrl-D, or Ctrl-C on an empty line (the caller ends the session),
    and "" for Ctrl-C on a line with text (the line is discarded, as in a shell). Without
    ``readline`` the typed text cannot be seen, so Ctrl-C always ends the session.
    """

    def __init__(self, out: IO[str], readline: ModuleType | None,
                 guard: ReadlineGuard | None = None) -> None:
        self.out, self.readline, self.guard = out, readline, guard

    def read(self) -> str | None:
        if self.guard is not None:
            self.guard.begin_line()
        try:
            line = input(PROMPT)
        except EOFError:  # Ctrl-D on an empty line
            pass
        except KeyboardInterrupt:
            if self.readline is not None and self.readline.get_line_buffer():
                self.out.write("\n")  # leave the discarded line visible, start a fresh prompt
                return ""
        else:
            return self._checked(line)
        self.out.write("\n")  # the shell's prompt starts on its own line
        self.out.flush()
        return None

    def _checked(self, line: str) -> str | None:
        """A line ``input()`` returned, as the guard saw it typed (``readline_guard``)."""
        if self.guard is None:
            return line
        seen = self.guard.line()
        if seen.interrupted:  # Ctrl-C while the guard waited: readline already ended the line
            self._forget(line)
            return "" if line else None
        text = seen.text(line)
        if text != line:
            self._forget(line)
        return text

    def _forget(self, line: str) -> None:
        """Drop ``line`` from the history if ``input()`` just added it."""
        assert self.readline is not None
        length = self.readline.get_current_history_length()
        if line and length and self.readline.get_history_item(length) == line:
            self.readline.remove_history_item(length - 1)


def escape_undecodable_bytes(stream: IO[str]) -> None:
    """Make ``stream`` decode with ``errors="surrogateescape"`` (``input()`` follows the handler
    of ``sys.stdin`` too). A stream that cannot be reconfigured (not a ``TextIOWrapper``, or
    already read from) is left as it is."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        with suppress(io.UnsupportedOperation):
            reconfigure(errors="surrogateescape")


@contextmanager
def terminal_input(out: IO[str], history_file: Path | None) -> Iterator[TerminalInput]:
    """A ``TerminalInput`` with history loaded from ``history_file`` (None: none kept on disk)
    and saved back to it at the end, at most ``HISTORY_LENGTH`` lines, readable by the user
    only. A history file that cannot be read or written is logged and the chat goes on."""
    try:
        import readline
    except ImportError:  # Python built without readline/libedit (e.g. Windows): plain input()
        yield TerminalInput(out, None)
        return
    readline.clear_history()  # a fresh session, even when called twice in one process
    readline.set_history_length(HISTORY_LENGTH)
    if history_file is not None and history_file.exists():
        try:
            readline.read_history_file(str(history_file))
        except OSError as exc:
            log.warning("chat history: could not read %s: %s", history_file, exc)
    guard = install_guard(readline)
    try:
        yield TerminalInput(out, readline, guard)
    finally:
        if guard is not None:
            guard.uninstall()
        if history_file is not None:
            _save_history(readline, history_file)


def _save_history(readline: ModuleType, path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # a new file is private
        readline.write_history_file(str(path))
    except OSError as exc:
        log.warning("chat history: could not write %s: %s", path, exc)
