"""A Hugging Face `tokenizer.json` as a `TokenModel` (see `tokenizer.py`), through the
`tokenizers` library that transformers' fast tokenizers run on.

Both kinds of tokenizer.json that MoE models ship work the same way here:
- byte-level BPE (GPT-2, Qwen, OLMoE, gpt-oss): every token stands for bytes, written with
  GPT-2's byte-to-character table; one character's UTF-8 bytes may be split across tokens;
- SentencePiece converted (HF Mixtral folders): `▁` for spaces and `<0xNN>` byte-fallback
  pieces, decoded by the ByteFallback decoder.

Special tokens are the tokenizer.json's `added_tokens` marked special plus the named tokens of
tokenizer_config.json (transformers marks those special too). As transformers' `decode(...,
skip_special_tokens=True)`, decoding drops them before the decoder runs: they are *skipped*,
and the bytes on either side of one join as if it were absent. `encode` turns their text
into their ids (unless `split_special_tokens`), and adds what the file's `post_processor` adds
to a raw text (BOS for Mixtral, nothing for Qwen) when asked for special tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from offload_rt.errors import TokenizerError
from offload_rt.tokenizer_config import TokenizerSettings

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode`, inverted: the character each byte is written as -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


_BYTE_LEVEL = _byte_level_table()


class TokenizerJsonModel:
    """A loaded tokenizer.json; ids 0 .. piece_count - 1 (ids it has no token for decode to
    nothing, like special tokens)."""

    def __init__(self, tokenizer: RustTokenizer, path: Path, settings: TokenizerSettings) -> None:
        self._tk = tokenizer
        self.path = path
        self.special_tokens: dict[str, str] = dict(settings.special_tokens)
        self.bos_id = self._named_id("bos_token", settings)
        self.eos_id = self._named_id("eos_token", settings)
        self._mark_special(settings)
        tokenizer.encode_special_tokens = settings.split_special_tokens
        self._added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self.piece_count: int = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        decoders = _decoder_types(tokenizer)
        self._byte_level = "ByteLevel" in decoders
        self._byte_fallback = "ByteFallback" in decoders
        _check_cleanup(tokenizer, settings)

    @classmethod
    def from_file(cls, path: Path, settings: TokenizerSettings | None = None
                  ) -> TokenizerJsonModel:
        """Load `path`; TokenizerError names the file when `tokenizers` cannot read it."""
        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the binding raises bare Exceptions
            raise TokenizerError(f"{path} is not a tokenizer.json the tokenizers library can "
                                 f"read: {exc}") from None
        if tokenizer.get_vocab_size(with_added_tokens=True) == 0:
            raise TokenizerError(f"{path}: the tokenizer has an empty vocabulary")
        log.debug("loaded tokenizer.json %s (%d tokens)", path, tokenizer.get_vocab_size())
        return cls(tokenizer, path, settings or TokenizerSettings())

    def _mark_special(self, settings: TokenizerSettings) -> None:
        """Named and extra special tokens of tokenizer_config.json become special, as
        transformers' `_post_init` makes them; text the vocabulary lacks is left out (BOS and
        EOS were checked before: `_named_id`)."""
        added = self._tk.get_added_tokens_decoder()
        for text in (*settings.special_tokens.values(), *settings.extra_special_tokens):
            token_id = self._tk.token_to_id(text)
            if token_id is None:
                log.warning("%s names the special token %r, which %s does not have; it stays "
                            "plain text", settings.path, text, self.path)
            elif token_id not in added or not added[token_id].special:
                self._tk.add_special_tokens([AddedToken(text, special=True, normalized=False)])

    def _named_id(self, name: str, settings: TokenizerSettings) -> int | None:
        text = settings.special_tokens.get(name)
        if text is None:
            return None
        token_id = self._tk.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"{settings.where(name)} is {text!r}, which is not a token of "
                                 f"{self.path}; the two files do not belong together")
        return int(token_id)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Ids of `text`; with `add_special_tokens`, what the post_processor adds too."""
        try:
            return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)
        except Exception as exc:  # noqa: BLE001 - the binding raises bare Exceptions
            raise TokenizerError(f"{self.path}: cannot encode {text[:40]!r}: {exc}") from None

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a chat template's output (transformers: add_special_tokens=False)."""
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (all < piece_count), special tokens skipped; incomplete UTF-8 becomes
        U+FFFD."""
        return str(self._tk.decode(list(ids), skip_special_tokens=True))

    def piece(self, token_id: int) -> str:
        piece = self._tk.id_to_token(token_id)
        return f"[PAD{token_id}]" if piece is None else str(piece)

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self._tk.token_to_id(piece)
        return None if token_id is None else int(token_id)

    def is_control(self, token_id: int) -> bool:
        """A special token, or an id the file has no token for: no text."""
        return token_id in self._special_ids or self._tk.id_to_token(token_id) is None

    def is_skipped(self, token_id: int) -> bool:
        """Special tokens are dropped before decoding (skip_special_tokens)."""
        return self.is_control(token_id)

    def byte_value(self, token_id: int) -> int | None:
        """The byte of a byte-fallback piece (`<0xNN>`); None for any other token."""
        if not self._byte_fallback or token_id in self._added:
            return None
        match = _BYTE_PIECE.fullmatch(self._tk.id_to_token(token_id) or "")
        return int(match.group(1), 16) if match else None

    @property
    def decodes_byte_runs_whole(self) -> bool:
        """The ByteFallback decoder turns a run of `<0xNN>` pieces into text as a whole, and
        into one U+FFFD per byte when any byte of the run is invalid UTF-8 (a valid character
        before an invalid byte included); ByteLevel decodes invalid bytes one by one."""
        return self._byte_fallback and not self._byte_level

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a byte-level token or a byte-fallback piece stands for; None for a token
        the decoder turns into text as a whole (or a special token)."""
        if self.is_control(token_id):
            return None
        if self._byte_level:
            piece = self._tk.id_to_token(token_id)
            if all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            return piece.encode()  # the ByteLevel decoder keeps such a token's text as it is
        value = self.byte_value(token_id)
        return None if value is None else bytes([value])

    @cached_property
    def control_pieces(self) -> tuple[str, ...]:
        return tuple(self._added[i].content for i in sorted(self._special_ids))

    def recognizes(self, text: str) -> bool:
        """Whether `encode` turns exactly `text` into its one added token."""
        token_id = self._tk.token_to_id(text)
        if token_id not in self._added:
            return False
        return not (self._added[token_id].special and self._tk.encode_special_tokens)


def _decoder_types(tokenizer: RustTokenizer) -> set[str]:
    """The `type` of the decoder and of every decoder nested in it (a Sequence)."""
    if tokenizer.decoder is None:
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for child in node.get("decoders", ()):
                walk(child)

    walk(json.loads(tokenizer.decoder.__getstate__()))
    return found


def _check_cleanup(tokenizer: RustTokenizer, settings: TokenizerSettings) -> None:
    """transformers edits decoded text (" ." -> ".") for non-BPE models that ask for it."""
    model = type(tokenizer.model).__name__
    if settings.clean_up_tokenization_spaces and (model != "BPE" or settings.clean_up_bpe):
        raise TokenizerError(
            f"{settings.where('clean_up_tokenization_spaces')} is true for a {model} tokenizer: "
            "transformers then removes spaces before punctuation in decoded text, which "
            "offload_rt does not do; set it to false to run this model")
