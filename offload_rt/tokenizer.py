"""Text <-> token ids through the model's own SentencePiece file.

Mixtral ships a SentencePiece model with byte fallback: text the vocabulary cannot spell is
written as one `<0xNN>` piece per UTF-8 byte. Streaming detokenization (`stream_decoder.py`)
needs to see those bytes and the control tokens, so this wrapper exposes them next to the
usual encode/decode.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from offload_rt.errors import TokenizerError

log = logging.getLogger(__name__)

# Looked for in this order: Hugging Face folders hold `tokenizer.model`; mistral-inference
# folders hold the versioned name. Only v1 matches the chat template in `chat_template.py`.
TOKENIZER_FILE_NAMES = (
    "tokenizer.model",
    "tokenizer.model.v1",
    "tokenizer.model.v2",
    "tokenizer.model.v3",
)

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """A loaded SentencePiece model; build it with `from_file` or `from_model_dir`."""

    def __init__(self, processor: SentencePieceProcessor, path: Path) -> None:
        self._sp = processor
        self.path = path
        self._vocab_size: int = processor.vocab_size()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a SentencePiece model file; TokenizerError names the file when that fails."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
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
        log.debug("loaded tokenizer %s (vocab %d)", path, processor.vocab_size())
        return cls(processor, path)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """Load the first of `TOKENIZER_FILE_NAMES` found in a model folder."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerError(f"model folder not found: {model_dir}")
        for name in TOKENIZER_FILE_NAMES:
            candidate = model_dir / name
            if candidate.is_file():
                return cls.from_file(candidate)
        looked_for = ", ".join(TOKENIZER_FILE_NAMES)
        raise TokenizerError(f"no tokenizer file in {model_dir}; looked for: {looked_for}")

    @property
    def vocab_size(self) -> int:
        """Number of token ids; valid ids are 0 .. vocab_size - 1."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (`<s>`, 1 for Mixtral)."""
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (`</s>`, 2 for Mixtral); generation stops on it."""
        return int(self._sp.eos_id())

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with SentencePiece's usual leading "▁" on the first piece."""
        ids: list[int] = self._sp.encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens vanish and incomplete UTF-8 bytes become U+FFFD."""
        ids = [self._check_id(i) for i in ids]
        return str(self._sp.decode(ids))

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, e.g. "▁Hello" or "<0xE2>"."""
        return str(self._sp.id_to_piece(self._check_id(token_id)))

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry, or None when the vocabulary has no such piece."""
        token_id = int(self._sp.piece_to_id(piece))
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def is_control(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (BOS, EOS, ...), which decodes to nothing."""
        return bool(self._sp.is_control(self._check_id(token_id)))

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece (`<0xNN>`) stands for; None for any other piece."""
        if not self._sp.is_byte(self._check_id(token_id)):
            return None
        match = _BYTE_PIECE.fullmatch(self._sp.id_to_piece(token_id))
        return int(match.group(1), 16) if match else None

    def _check_id(self, token_id: int) -> int:
        # SentencePiece raises a bare IndexError; name the id and the valid range instead.
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} outside vocabulary 0..{self._vocab_size - 1}")
        return int(token_id)

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self._vocab_size})"
