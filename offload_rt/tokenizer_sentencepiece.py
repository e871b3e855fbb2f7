"""A SentencePiece model file (`tokenizer.model`) as a `TokenModel` (see `tokenizer.py`).

Mixtral ships a SentencePiece model with byte fallback: text the vocabulary cannot spell is
written as one `<0xNN>` piece per UTF-8 byte. Control pieces (`<s>`, `</s>`) decode to nothing
and, like any non-byte piece, end a run of byte pieces. `encode` treats the text of a control
piece ("<s>") as plain characters; `encode_rendered`, for a chat template's output, turns it
into its id as transformers does with special tokens (each stretch between them is encoded on
its own, with SentencePiece's leading "▁", as transformers' legacy Llama tokenizers do).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from offload_rt.errors import TokenizerError

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceModel:
    """A loaded SentencePiece model; ids 0 .. piece_count - 1 are its pieces."""

    def __init__(self, processor: SentencePieceProcessor, path: Path,
                 special_tokens: Mapping[str, str] | None = None) -> None:
        """`special_tokens`: tokenizer_config.json's named tokens (chat template variables),
        over the model's own `<s>`/`</s>`/`<unk>` pieces."""
        self._sp = processor
        self.path = path
        self.piece_count: int = processor.vocab_size()
        own = {"bos_token": processor.id_to_piece(processor.bos_id()),
               "eos_token": processor.id_to_piece(processor.eos_id())}
        if processor.unk_id() >= 0:
            own["unk_token"] = processor.id_to_piece(processor.unk_id())
        self.special_tokens: dict[str, str] = {**own, **(special_tokens or {})}

    @classmethod
    def from_file(cls, path: Path, special_tokens: Mapping[str, str] | None = None
                  ) -> SentencePieceModel:
        """Load a SentencePiece model file; TokenizerError names the file when that fails."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from exc
        processor = SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except RuntimeError as exc:
            raise TokenizerError(f"{path} is not a SentencePiece model: {exc}") from exc
        if processor.vocab_size() <= 0 or processor.bos_id() < 0 or processor.eos_id() < 0:
            raise TokenizerError(f"{path}: SentencePiece model lacks a vocabulary or BOS/EOS ids")
        log.debug("loaded SentencePiece tokenizer %s (vocab %d)", path, processor.vocab_size())
        return cls(processor, path, special_tokens)

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Ids of `text` (control piece text stays plain); BOS first when add_special_tokens."""
        try:
            ids: list[int] = self._sp.encode(text)
        except RuntimeError as exc:  # pybind11 could not pass the string; name the file at least
            raise TokenizerError(f"{self.path}: cannot encode {text[:40]!r}: {exc}") from exc
        return [self.bos_id, *ids] if add_special_tokens else ids

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a chat template's output: control pieces' text becomes their ids."""
        ids: list[int] = []
        for index, part in enumerate(self._special_text.split(text)):
            if index % 2:  # a captured control piece
                ids.append(int(self._sp.piece_to_id(part)))
            elif part:
                ids += self.encode(part, add_special_tokens=False)
        return ids

    @cached_property
    def _special_text(self) -> re.Pattern[str]:
        pieces = sorted({*self.control_pieces, self._sp.id_to_piece(self._sp.unk_id())},
                        key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, pieces)) + ")")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (all < piece_count); incomplete UTF-8 bytes become U+FFFD."""
        return str(self._sp.decode(list(ids)))

    def piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        token_id = int(self._sp.piece_to_id(piece))
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def is_control(self, token_id: int) -> bool:
        return bool(self._sp.is_control(token_id))

    def is_skipped(self, token_id: int) -> bool:
        """Never: SentencePiece decodes control pieces (to nothing) in place."""
        return False

    def byte_value(self, token_id: int) -> int | None:
        if not self._sp.is_byte(token_id):
            return None
        match = _BYTE_PIECE.fullmatch(self._sp.id_to_piece(token_id))
        return int(match.group(1), 16) if match else None

    decodes_byte_runs_whole = False  # SentencePiece decodes invalid bytes one by one

    def token_bytes(self, token_id: int) -> bytes | None:
        """A byte piece's one byte; None for pieces decoded as text."""
        value = self.byte_value(token_id)
        return None if value is None else bytes([value])

    @cached_property
    def control_pieces(self) -> tuple[str, ...]:
        sp = self._sp
        return tuple(sp.id_to_piece(i) for i in range(self.piece_count) if sp.is_control(i))

    def recognizes(self, text: str) -> bool:
        """Never: `encode` spells every text out as ordinary pieces."""
        return False
