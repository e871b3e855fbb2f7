"""Typed bytes that are not UTF-8 reach the chat as such, whatever GNU readline would do with them.

GNU readline (8.x, in a UTF-8 locale) holds a byte that begins a multibyte sequence until the
sequence completes, and lets ASCII bytes pass meanwhile: a Latin-1 terminal's ``caf\\xe9 ok``
became ``caf ok`` (the held 0xe9 silently left out), ``caf\\xe9`` + Enter became ``caf``, and
the held byte was inserted into a later line at its next non-ASCII byte (``naïve`` became
``na\\xe9ïve``). Python's ``readline`` module offers no hook on raw input, so this module sets
readline's ``rl_getc_function`` (its documented input hook) through ``ctypes`` to a reader that
validates the bytes first (the UTF-8 of RFC 3629, as Python's strict decoder reads it):

* a valid character is handed to readline whole (its continuation bytes pushed with
  ``rl_stuff_char``, which readline reads before asking for more input), as before;
* each byte of an invalid sequence is handed over as U+FFFD (shown where the byte was typed)
  and recorded. ``GuardedLine.text`` turns the markers of a line back into the bytes they
  stand for, as surrogate escapes (PEP 383), so ``text_input.check_text`` refuses the line
  whole, naming the byte and its offset, as for piped input. Nothing is held across lines.

A lead byte is judged once the byte after it arrives (a terminal sends a character's bytes
together); meanwhile Ctrl-C still works: the reader's wait is ``os.read``, interrupted by the
signal, and the interrupt becomes an Enter on a line marked ``interrupted``, which the caller
treats as Ctrl-C. libedit (macOS) keeps its own handling: the guard is not installed there.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger(__name__)
MARKER = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER, shown for each invalid byte
_MARKER_BYTES = list(MARKER.encode("utf-8"))
_ENTER, _EOF = 13, -1
_GETC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)  # rl_getc_func_t: int (*)(FILE *)


def _sequence(lead: int) -> tuple[int, int, int]:
    """(continuation bytes needed, range of the first one) for a lead byte; 0 when the byte
    cannot begin a character (RFC 3629 table 3-7: no overlongs, surrogates or > U+10FFFF)."""
    if 0xC2 <= lead <= 0xDF:
        return 1, 0x80, 0xBF
    if 0xE0 <= lead <= 0xEF:
        return 2, 0xA0 if lead == 0xE0 else 0x80, 0x9F if lead == 0xED else 0xBF
    if 0xF0 <= lead <= 0xF4:
        return 3, 0x90 if lead == 0xF0 else 0x80, 0x8F if lead == 0xF4 else 0xBF
    return 0, 0, 0


@dataclass
class GuardedLine:
    """What the guard saw of one line: the invalid bytes typed, in order, and whether Ctrl-C
    came while it was reading."""

    bad_bytes: list[int]
    interrupted: bool

    def text(self, line: str) -> str:
        """``line`` with its U+FFFD markers, left to right, back as the bytes they stand for
        (``"\\udce9"`` for 0xe9); a line with no invalid byte is returned as it is."""
        if not self.bad_bytes:
            return line
        parts = line.split(MARKER)
        escapes = [chr(0xDC00 + b) for b in self.bad_bytes]
        out = [parts[0]]
        for index, part in enumerate(parts[1:]):
            out.append((escapes[index] if index < len(escapes) else MARKER) + part)
        return "".join(out)


class TypedBytes:
    """Turns the bytes typed into what readline may see: one call of ``next_char`` reads one
    character (``read()`` gives a byte, or ``_EOF``) and returns its bytes when valid UTF-8,
    else one U+FFFD per invalid byte, appending those bytes to ``bad_bytes``."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read
        self.pushback: list[int] = []  # read ahead past an invalid sequence: not yet judged
        self.bad_bytes: list[int] = []

    def next_char(self) -> list[int]:
        lead = self._take()
        if lead < 0x80:  # ASCII, or _EOF
            return [lead]
        needed, low, high = _sequence(lead)
        sequence = [lead]
        for _ in range(needed):
            byte = self._take()
            if not low <= byte <= high:
                self.pushback.append(byte)
                break
            sequence.append(byte)
            low, high = 0x80, 0xBF
        else:
            if needed:
                return sequence
        self.bad_bytes += sequence
        return _MARKER_BYTES * len(sequence)

    def next_bytes(self) -> list[int]:
        """The next character's bytes and those of any read ahead meanwhile (a byte read past
        an invalid sequence must reach readline now: readline asks again only when the
        terminal has more input). ``_EOF`` comes alone."""
        out = self.next_char()
        while self.pushback and self.pushback[0] != _EOF and out[-1] != _EOF:
            out += self.next_char()
        return out

    def _take(self) -> int:
        return self.pushback.pop(0) if self.pushback else self.read()


class ReadlineGuard:
    """The reader installed as ``rl_getc_function``; ``begin_line`` before each ``input()``,
    ``line()`` after it, ``uninstall`` at the end of the session."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._slot = ctypes.c_void_p.in_dll(lib, "rl_getc_function")
        self._stuff = lib.rl_stuff_char
        self._stuff.argtypes, self._stuff.restype = [ctypes.c_int], ctypes.c_int
        self._fileno = ctypes.CDLL(None).fileno
        self._fileno.argtypes, self._fileno.restype = [ctypes.c_void_p], ctypes.c_int
        self._original = self._slot.value
        self._callback = _GETC(self._getc)  # kept: readline holds only its address
        self._fd = -1
        self._typed = TypedBytes(self._read)
        self._interrupted = False
        self._slot.value = ctypes.cast(self._callback, ctypes.c_void_p).value

    def uninstall(self) -> None:
        self._slot.value = self._original

    def begin_line(self) -> None:
        self._typed.bad_bytes, self._interrupted = [], False

    def line(self) -> GuardedLine:
        return GuardedLine(list(self._typed.bad_bytes), self._interrupted)

    def _getc(self, stream: int | None) -> int:
        """readline asks for one byte; it gets a valid character's first byte (the rest
        stuffed), a marker's, or ``_ENTER`` after Ctrl-C. Never raises into C."""
        try:
            self._fd = self._fileno(stream)
            first, *rest = self._typed.next_bytes()
            for byte in rest:
                self._stuff(byte)
            return first
        except KeyboardInterrupt:
            self._interrupted = True
            self._typed.pushback.clear()
            return _ENTER
        except Exception:  # a bug here must not kill the chat from inside readline
            log.exception("chat input: reading the terminal failed")
            return _EOF

    def _read(self) -> int:
        try:
            data = os.read(self._fd, 1)  # Ctrl-C interrupts it (KeyboardInterrupt, PEP 475)
        except OSError:
            return _EOF
        return data[0] if data else _EOF


def install(readline: ModuleType) -> ReadlineGuard | None:
    """Guard GNU readline's input; None where it cannot be (libedit, no ctypes symbols)."""
    if "libedit" in (readline.__doc__ or ""):
        return None
    try:
        return ReadlineGuard(ctypes.CDLL(readline.__file__))
    except (OSError, AttributeError, ValueError) as exc:
        log.info("chat input: cannot guard readline's input (%s): typed bytes that are not "
                 "UTF-8 may be changed by readline", exc)
        return None
