"""Text from outside (command line, stdin, API strings): valid Unicode, or a clear error.

Policy: text that is not valid UTF-8 is refused with an ``OptionError``, never repaired. A
prompt with a replacement character (U+FFFD) where the user's bytes were would still run and
answer a question nobody asked (a silent wrong answer); the usual cause is a file in another
encoding (Latin-1, UTF-16), which the user can convert (``iconv -f latin1 -t utf-8``).

Python hands undecodable input over as lone surrogates (PEP 383 ``surrogateescape``): argv and a
stdin opened under the C/POSIX locale carry each byte 0x80..0xFF it could not decode as
U+DC80..U+DCFF. A JSON string can hold other lone surrogates (``"\\ud800"``). SentencePiece
cannot encode either (pybind11 fails to convert the string), so every edge checks first.
"""

from __future__ import annotations

import codecs

from offload_rt.errors import OptionError

BOM = "\ufeff"  # U+FEFF, the byte order mark: EF BB BF at the start of "UTF-8 with BOM" files
_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # surrogateescape: U+DC80 + (byte - 0x80)
_CONTEXT_CHARS = 20  # valid text shown before the first bad character


def check_text(text: str, source: str) -> str:
    """Return ``text`` unchanged when it is valid Unicode (encodable as UTF-8).

    ``source`` names where the text came from ("--prompt", "messages[1] content", ...).
    Raises OptionError naming the source, the first bad byte (or lone surrogate) and its byte
    offset in the UTF-8 input, with the valid text just before it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OptionError(_describe_surrogate(text, exc.start, source)) from None
    return text


def decode_text(data: bytes, source: str, encoding: str = "utf-8") -> str:
    """``data`` decoded (strict); OptionError names ``source`` and the first bad byte's offset."""
    try:
        return check_text(data.decode(encoding), source)  # a "utf-8" decode is always valid
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode(encoding)
        raise OptionError(_message(source, f"byte 0x{data[exc.start]:02x}", exc.start, before,
                                   _display_name(encoding))) from None


def _display_name(encoding: str) -> str:
    name = codecs.lookup(encoding).name
    return "UTF-8" if name == "utf-8" else name


def _describe_surrogate(text: str, index: int, source: str) -> str:
    before = text[:index]  # valid: the first bad character is at `index`
    offset = len(before.encode("utf-8"))
    code = ord(text[index])
    what = (f"byte 0x{code - 0xDC00:02x}" if code in _ESCAPED_BYTES
            else f"lone surrogate U+{code:04X}")
    return _message(source, what, offset, before)


def _message(source: str, what: str, offset: int, before: str, encoding: str = "UTF-8") -> str:
    context = before[-_CONTEXT_CHARS:]
    return (f"{source}: not valid {encoding} text: {what} at byte offset {offset} (after "
            f"{context!r}); save the text as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
