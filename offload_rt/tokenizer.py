"""Text <-> token ids through the model's own tokenizer file: the one interface the runtime,
the prompt and chat code and the streaming decoder use.

A folder's tokenizer is chosen by the file it has (`TOKENIZER_FILE_NAMES`, first found wins):
- `tokenizer.json` (Hugging Face `tokenizers`; `tokenizer_json.py`) with the special tokens of
  `tokenizer_config.json`. It wins over a `tokenizer.model` in the same folder (HF Mixtral
  folders ship both), as in transformers, whose fast tokenizer loads tokenizer.json whenever
  the folder has one: the added tokens and chat template are written against it.
- `tokenizer.model` (SentencePiece; `tokenizer_sentencepiece.py`), or the versioned names of
  mistral-inference folders. Only v1 matches the built-in template in `chat_template.py`.
The folder's own chat template (`chat_template_files.py`), if any, comes with it.

A model may have more embedding rows than the file has pieces (`fit_to_model`): a vocabulary
padded for alignment or for tokens added in another file, e.g. 32002 rows for Mixtral's 32000
pieces. The ids the file lacks are *padding ids*: they decode to nothing, like control tokens,
and the runtime never samples them (see `padding_ids`). A file with more pieces than the model
has rows is refused: its extra ids would index past the embedding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Protocol

from offload_rt.chat_template_files import find_chat_template
from offload_rt.chat_template_jinja import JinjaChatTemplate
from offload_rt.errors import TokenIdError, TokenizerError
from offload_rt.text_input import check_text
from offload_rt.tokenizer_config import read_tokenizer_settings
from offload_rt.tokenizer_json import TokenizerJsonModel
from offload_rt.tokenizer_sentencepiece import SentencePieceModel

log = logging.getLogger(__name__)

JSON_FILE = "tokenizer.json"
TOKENIZER_FILE_NAMES = (
    JSON_FILE,
    "tokenizer.model",
    "tokenizer.model.v1",
    "tokenizer.model.v2",
    "tokenizer.model.v3",
)
# Markers of the built-in Mixtral-Instruct v1 template (chat_template.py).
CHAT_MARKERS = ("[INST]", "[/INST]")


class TokenModel(Protocol):
    """What a tokenizer file provides; ids 0 .. piece_count - 1 (`SentencePieceModel`,
    `TokenizerJsonModel`). Ids reach it already checked against that range."""

    path: Path
    piece_count: int
    special_tokens: Mapping[str, str]  # name -> text (chat template variables)

    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def control_pieces(self) -> tuple[str, ...]: ...
    @property
    def decodes_byte_runs_whole(self) -> bool: ...
    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...
    def encode_rendered(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def piece(self, token_id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def is_control(self, token_id: int) -> bool: ...
    def is_skipped(self, token_id: int) -> bool: ...
    def byte_value(self, token_id: int) -> int | None: ...
    def token_bytes(self, token_id: int) -> bytes | None: ...
    def recognizes(self, text: str) -> bool: ...


def has_tokenizer_file(model_dir: Path) -> bool:
    """Whether the folder has a tokenizer file: tokenizer.json or any `tokenizer.model*` (an
    unsupported version is then refused by name at load, not taken for no tokenizer)."""
    model_dir = Path(model_dir)
    return (model_dir / JSON_FILE).is_file() or any(model_dir.glob("tokenizer.model*"))


class Tokenizer:
    """A loaded tokenizer; build it with `from_file` or `from_model_dir`."""

    def __init__(self, model: TokenModel, vocab_size: int | None = None,
                 chat_template: JinjaChatTemplate | None = None) -> None:
        self._model = model
        self.path = model.path
        self.piece_count: int = model.piece_count  # ids the file has
        self._vocab_size = self.piece_count if vocab_size is None else vocab_size
        self.chat_template = chat_template  # None: the built-in Mixtral template

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer file alone (`*.json`: tokenizer.json, else SentencePiece), without
        the folder's settings; TokenizerError names the file when that fails."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls(TokenizerJsonModel.from_file(path))
        return cls(SentencePieceModel.from_file(path))

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """The folder's tokenizer (the first of `TOKENIZER_FILE_NAMES` found) with its
        tokenizer_config.json's special tokens and its chat template."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerError(f"model folder not found: {model_dir}")
        path = next((model_dir / n for n in TOKENIZER_FILE_NAMES if (model_dir / n).is_file()),
                    None)
        if path is None:
            looked_for = ", ".join(TOKENIZER_FILE_NAMES)
            raise TokenizerError(f"no tokenizer file in {model_dir}; looked for: {looked_for}")
        settings = read_tokenizer_settings(model_dir)
        model: TokenModel = (TokenizerJsonModel.from_file(path, settings)
                             if path.name == JSON_FILE
                             else SentencePieceModel.from_file(path, settings.special_tokens))
        template = find_chat_template(model_dir, settings, model.special_tokens)
        return cls(model, chat_template=template)

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
        return type(self)(self._model, rows, self.chat_template)

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
        """Text of the control (special) tokens (`<s>`, `</s>`, `<|im_end|>`...), in id order."""
        return self._model.control_pieces

    @property
    def special_tokens(self) -> Mapping[str, str]:
        """Named special tokens' text (`bos_token`, `eos_token`...): chat template variables."""
        return self._model.special_tokens

    def spelled_markers(self, text: str) -> list[str]:
        """Control pieces (and, under the built-in template, its `[INST]` markers) that `text`
        spells out and `encode` keeps as plain characters: SentencePiece makes "<s>" the
        pieces "▁<", "s", ">"; a tokenizer.json turns it into its id (nothing to warn of)."""
        markers = (*self.control_pieces, *(CHAT_MARKERS if self.chat_template is None else ()))
        return [m for m in dict.fromkeys(markers)
                if m in text and not self._model.recognizes(m)]

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (`<s>`, 1 for Mixtral); None when the tokenizer has none."""
        return self._model.bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id (`</s>`, 2 for Mixtral); None when the tokenizer names none."""
        return self._model.eos_id

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` (a SentencePiece model adds its usual leading "▁").

        `bos`: start as the tokenizer starts a raw text (SentencePiece: BOS; tokenizer.json:
        what its post_processor adds, as transformers' `add_special_tokens=True`). `eos`: end
        with the EOS id. Text that is not valid Unicode raises OptionError (`check_text`).
        """
        check_text(text, "text to encode")
        ids = self._model.encode(text, add_special_tokens=bos)
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.path}: the tokenizer has no EOS token to end with")
            ids.append(self.eos_id)
        return ids

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a chat template's output: nothing added; special tokens' text becomes their
        ids (transformers' `apply_chat_template`)."""
        return self._model.encode_rendered(check_text(text, "rendered chat template"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control and padding ids vanish, incomplete UTF-8 bytes become U+FFFD."""
        return self._model.decode([i for i in map(self._check_id, ids) if i < self.piece_count])

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, e.g. "▁Hello", "<0xE2>" or "[PAD32001]"."""
        if self._check_id(token_id) >= self.piece_count:
            return f"[PAD{token_id}]"  # llama.cpp's converters name padding pieces so
        return self._model.piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry, or None when the vocabulary has no such piece."""
        return self._model.piece_to_id(piece)

    def is_control(self, token_id: int) -> bool:
        """Whether `token_id` is a control token (BOS, EOS, ..., or a padding id): no text."""
        return self._check_id(token_id) >= self.piece_count or self._model.is_control(token_id)

    def is_skipped(self, token_id: int) -> bool:
        """Whether `decode` drops `token_id` before decoding, so the text around it decodes as
        if it were absent (padding ids; a tokenizer.json's special tokens). SentencePiece
        control pieces are not skipped: they end a run of byte pieces."""
        return self._check_id(token_id) >= self.piece_count or self._model.is_skipped(token_id)

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece (`<0xNN>`) stands for; None for any other piece."""
        if self._check_id(token_id) >= self.piece_count:
            return None
        return self._model.byte_value(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The UTF-8 bytes `token_id` adds when its decoder works on bytes (a byte-fallback
        piece, any byte-level BPE token); None for a piece decoded as text or a control id.
        One character's bytes may be split across ids (`stream_decoder.py` waits for them)."""
        if self._check_id(token_id) >= self.piece_count:
            return None
        return self._model.token_bytes(token_id)

    @property
    def decodes_byte_runs_whole(self) -> bool:
        """Whether a run of byte pieces decodes only as a whole: tokenizers' ByteFallback
        decoder makes every byte of the run U+FFFD when one is invalid, so the run's text is
        certain only when it ends. SentencePiece and byte-level BPE decode invalid bytes one by
        one: a complete character's text is certain at once."""
        return self._model.decodes_byte_runs_whole

    def _check_id(self, token_id: int) -> int:
        # The libraries raise bare errors; name the id, the range and the file instead.
        if not 0 <= token_id < self._vocab_size:
            raise TokenIdError(f"token id {token_id} outside vocabulary 0..{self._vocab_size - 1}"
                               f" of {self.path}")
        return int(token_id)

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self._vocab_size}, "
                f"piece_count={self.piece_count})")
