"""Text <-> token ids through the model's own SentencePiece file.

Mixtral ships a SentencePiece model with byte fallback: text the vocabulary cannot spell is
written as one `<0xNN>` piece per UTF-8 byte. Streaming detokenization (`stream_decoder.py`)
needs to see those bytes and the control tokens, so this wrapper exposes them next to the
usual encode/decode.

A model may have more embedding rows than the file has pieces (`fit_to_model`): a vocabulary
padded for alignment or for tokens added in another file, e.g. 32002 rows for Mixtral's 32000
pieces. The ids the file lacks are *padding ids*: they decode to nothing, like control tokens,
and the runtime never samples them (see `padding_ids`). A file with more pieces than the model
has rows is refused: its extra ids would index past the embedding.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from offload_rt.errors import TokenIdError, TokenizerError
from offload_rt.text_input import check_text

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
# Markers of the Mixtral-Instruct v1 template (chat_template.py), plain text in that vocabulary.
CHAT_MARKERS = ("[INST]", "[/INST]")


class Tokenizer:
    """A loaded SentencePiece model; build it with `from_file` or `from_model_dir`."""

    def __init__(self, processor: SentencePieceProcessor, path: Path,
                 vocab_size: int | None = None) -> None:
        self._sp = processor
        self.path = path
        self.piece_count: int = processor.vocab_size()  # pieces in the file
        self._vocab_size = self.piece_count if vocab_size is None else vocab_size

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

    def fit_to_model(self, model_vocab_size: int, config_file: Path) -> Tokenizer:
        """This tokenizer covering the model's ids 0 .. model_vocab_size - 1 (its embedding rows).

        More rows than pieces: ids from `piece_count` on become padding ids (see the module
        docstring), with one log line. More pieces than rows: TokenizerError naming both files.
        """
        rows, pieces = model_vocab_size, self.piece_count
        if pieces > rows:
            raise TokenizerError(
                f"{self.path} has {pieces} pieces but {config_file} has vocab_size {rows} (the "
                f"model's embedding rows): ids {rows}..{pieces - 1} have no row; use the "
                "tokenizer the model was trained with")
        if pieces < rows:
            log.info("%s has vocab_size %d, %s has %d pieces: the %d ids %d..%d have no text; "
                     "they are never sampled (except the EOS id) and decode to nothing",
                     config_file, rows, self.path, pieces, rows - pieces, pieces, rows - 1)
        return Tokenizer(self._sp, self.path, rows)

    @property
    def vocab_size(self) -> int:
        """Number of token ids; valid ids are 0 .. vocab_size - 1 (padding ids included)."""
        return self._vocab_size

    @property
    def padding_ids(self) -> range:
        """Ids of the model's vocabulary that the file has no piece for (see `fit_to_model`)."""
        return range(self.piece_count, self._vocab_size)

    @cached_property
    def control_pieces(self) -> tuple[str, ...]:
        """Pieces of the control tokens (`<s>`, `</s>`, v3's `[INST]` ...), in id order."""
        sp = self._sp
        return tuple(sp.id_to_piece(i) for i in range(self.piece_count) if sp.is_control(i))

    def spelled_markers(self, text: str) -> list[str]:
        """Control pieces and chat-template markers that `text` spells out as plain characters.

        `encode` does not turn them into their ids: "<s>" becomes the pieces "▁<", "s", ">".
        """
        return [m for m in dict.fromkeys((*self.control_pieces, *CHAT_MARKERS)) if m in text]

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (`<s>`, 1 for Mixtral)."""
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (`</s>`, 2 for Mixtral); generation stops on it."""
        return int(self._sp.eos_id())

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with SentencePiece's usual leading "▁" on the first piece.

        Text that is not valid Unicode (lone surrogates) raises OptionError (`check_text`).
        """
        check_text(text, "text to encode")
        try:
            ids: list[int] = self._sp.encode(text)
        except RuntimeError as exc:  # pybind11 could not pass the string; name the file at least
            raise TokenizerError(f"{self.path}: cannot encode {text[:40]!r}: {exc}") from exc
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control and padding ids vanish, incomplete UTF-8 bytes become U+FFFD."""
        ids = [i for i in map(self._check_id, ids) if i < self.piece_count]
        return str(self._sp.decode(ids))

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, e.g. "▁Hello", "<0xE2>" or "[PAD32001]"."""
        if self._check_id(token_id) >= self.piece_count:
            return f"[PAD{token_id}]"  # llama.cpp's converters name padding pieces so
        return str(self._sp.id_to_piece(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry, or None when the vocabulary has no such piece."""
        token_id = int(self._sp.piece_to_id(piece))
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def is_control(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (BOS, EOS, ..., or a padding id): no text."""
        if self._check_id(token_id) >= self.piece_count:
            return True
        return bool(self._sp.is_control(token_id))

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece (`<0xNN>`) stands for; None for any other piece."""
        if self._check_id(token_id) >= self.piece_count or not self._sp.is_byte(token_id):
            return None
        match = _BYTE_PIECE.fullmatch(self._sp.id_to_piece(token_id))
        return int(match.group(1), 16) if match else None

    def _check_id(self, token_id: int) -> int:
        # SentencePiece raises a bare IndexError; name the id, the range and the file instead.
        if not 0 <= token_id < self._vocab_size:
            raise TokenIdError(f"token id {token_id} outside vocabulary 0..{self._vocab_size - 1}"
                               f" of {self.path}")
        return int(token_id)

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self._vocab_size}, "
                f"piece_count={self.piece_count})")
