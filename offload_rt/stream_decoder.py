"""Incremental detokenization: turn generated ids into text as soon as the text is certain.

Decoding ids one at a time is wrong in three ways:
- SentencePiece byte fallback spells a character the vocabulary lacks as one `<0xNN>` piece per
  UTF-8 byte, so "€" arrives as `<0xE2> <0x82> <0xAC>` and a lone `<0xE2>` decodes to U+FFFD;
- byte-level BPE (tokenizer.json of GPT-2, Qwen, OLMoE) tokens stand for bytes, and one
  character's bytes may be split across tokens ("東" = E6 9D B1 as `[E6 9D] [B1 ...]`);
- the SentencePiece decoder drops the leading space of the first piece only ("▁Hello" is
  "Hello" at the start, " Hello" later).

So we decode a short window of recent ids with the real decoder and emit what the window adds
beyond its already-emitted prefix. The window starts at the last id that produced text: that
keeps each decode short (O(1) amortized per token) while the first-piece space rule hits a
piece whose text was already emitted. Text is held back only while the bytes that the trailing
ids stand for (`Tokenizer.token_bytes`) end with the start of a UTF-8 character that more
bytes could still complete, or, for a decoder that decodes a run of byte pieces only as a
whole (`Tokenizer.decodes_byte_runs_whole`: tokenizers' ByteFallback), until the run ends. A
piece decoded as text ends such a run of bytes, as does a SentencePiece control piece; ids that `decode` drops before decoding (`Tokenizer.is_skipped`:
padding ids, a tokenizer.json's special tokens) are not part of the window at all.

Invariant: `"".join(d.push(t) for t in ids) + d.flush() == tokenizer.decode(ids)`.
"""

from __future__ import annotations

from offload_rt.tokenizer import Tokenizer

# Decoded in front of the stream when the caller keeps the leading space: its first piece takes
# SentencePiece's first-piece space rule, so the generated ids keep theirs.
_CONTEXT_TEXT = "a"
# A UTF-8 lead byte announces this many bytes. Lenient on purpose (overlong and out-of-range
# leads included): holding back too much only delays text, holding back too little breaks it.
_UTF8_LENGTHS = ((0xC0, 2), (0xE0, 3), (0xF0, 4), (0xF8, 0))


class StreamDecoder:
    """Feed generated ids one by one with `push`; `flush` at the end of the stream."""

    def __init__(self, tokenizer: Tokenizer, *, skip_leading_space: bool = True) -> None:
        """Start an empty stream.

        `skip_leading_space=False` keeps the first piece's space ("▁Hello" -> " Hello"), for
        text that continues something already shown, such as the prompt.
        """
        self._tokenizer = tokenizer
        self._skip_leading_space = skip_leading_space
        self._reset()

    def push(self, token_id: int) -> str:
        """Add one id; return the text it makes certain (often "", never a partial character)."""
        if self._tokenizer.is_skipped(token_id):  # also rejects ids outside the vocabulary
            return ""
        data = self._tokenizer.token_bytes(token_id)
        is_control = self._tokenizer.is_control(token_id)
        self._ids.append(token_id)
        if not is_control:
            self._last_text_index = len(self._ids) - 1
        if data is not None:
            self._tail_bytes = [*self._tail_bytes, *data][-3:]
            if self._tokenizer.decodes_byte_runs_whole or _is_incomplete_utf8(self._tail_bytes):
                return ""
        else:
            had_bytes = bool(self._tail_bytes)
            self._tail_bytes = []  # any other piece ends the byte run, completing it or not
            if is_control and not had_bytes:
                return ""  # control ids decode to nothing and change no earlier text
        return self._emit()

    def flush(self) -> str:
        """Return the held-back text (incomplete bytes as U+FFFD) and start a fresh stream."""
        text = self._tokenizer.decode(self._ids)[self._emitted_len :]
        self._reset()
        return text

    def _emit(self) -> str:
        """Decode the window, return its new text, then restart the window at the last text id.

        Called only when the window ends on a character boundary, so later ids cannot change
        the window's text; the new window starts at a text-producing id, whose text takes the
        first-piece space rule inside the already-emitted prefix.
        """
        text = self._tokenizer.decode(self._ids)
        new_text = text[self._emitted_len :]
        if self._last_text_index is not None and self._last_text_index > 0:
            self._ids = self._ids[self._last_text_index :]
            self._last_text_index = 0
            text = self._tokenizer.decode(self._ids)
        self._emitted_len = len(text)
        return new_text

    def _reset(self) -> None:
        # _ids is the decode window; _emitted_len is how much of its decoded text is out.
        self._ids: list[int] = []
        self._tail_bytes: list[int] = []  # last (up to 3) bytes of a trailing byte run
        self._last_text_index: int | None = None  # in _ids, of the last non-control id
        self._emitted_len = 0
        if not self._skip_leading_space:
            self._ids = self._tokenizer.encode(_CONTEXT_TEXT, bos=False)
            self._last_text_index = len(self._ids) - 1
            self._emitted_len = len(self._tokenizer.decode(self._ids))


def _is_incomplete_utf8(tail: list[int]) -> bool:
    """Whether `tail` ends with a lead byte and fewer continuation bytes than it announces."""
    for back, byte in enumerate(reversed(tail)):
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: look further back for its lead
        needed = next((n for lead, n in reversed(_UTF8_LENGTHS) if byte >= lead), 1)
        return back + 1 < needed
    return False
