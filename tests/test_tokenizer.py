"""Tokenizer wrapper against the real Mixtral v1 SentencePiece model shipped by mistral-common."""

from __future__ import annotations

from pathlib import Path

import mistral_common
import pytest
import sentencepiece

from offload_rt.errors import TokenizerError
from offload_rt.tokenizer import TOKENIZER_FILE_NAMES, Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces  ",
    "Crème brûlée à la française, naïve façade",
    "東京は日本の首都です。中文测试",
    "Emoji: 😀🚀👩‍👩‍👧 and ✨",
    "line one\nline two\ttabbed",
    "",
]


@pytest.fixture(scope="module")
def v1_path() -> Path:
    """The Mixtral v1 tokenizer file inside the installed mistral-common wheel."""
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def tok(v1_path: Path) -> Tokenizer:
    return Tokenizer.from_file(v1_path)


def test_mixtral_ids(tok: Tokenizer) -> None:
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    # SentencePiece collapses nothing here: Mistral's model keeps whitespace as written.
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_raw_sentencepiece(tok: Tokenizer, v1_path: Path, text: str) -> None:
    raw = sentencepiece.SentencePieceProcessor(model_file=str(v1_path))
    assert tok.encode(text, bos=False) == raw.encode(text)
    assert tok.encode(text) == [1, *raw.encode(text)]


def test_bos_eos_flags(tok: Tokenizer) -> None:
    body = tok.encode("Hello", bos=False)
    assert body == [22557]  # "▁Hello": SentencePiece adds the leading-space piece
    assert tok.encode("Hello") == [1, 22557]
    assert tok.encode("Hello", eos=True) == [1, 22557, 2]
    assert tok.encode("Hello", bos=False, eos=True) == [22557, 2]
    assert tok.decode([1, 22557, 2]) == "Hello"


def test_pieces_and_byte_fallback(tok: Tokenizer) -> None:
    assert tok.piece(22557) == "▁Hello"
    assert tok.piece(1) == "<s>"
    euro = [tok.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    assert [tok.byte_value(i) for i in euro] == [0xE2, 0x82, 0xAC]
    assert tok.decode(euro) == "€"
    assert tok.byte_value(22557) is None
    assert tok.is_control(1) and tok.is_control(2) and not tok.is_control(22557)
    assert tok.piece_to_id("▁Hello") == 22557
    assert tok.piece_to_id("no such piece") is None
    assert tok.piece_to_id("<unk>") == 0


def test_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="32000"):
        tok.decode([1, 32000])
    with pytest.raises(ValueError, match="-1"):
        tok.piece(-1)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match=r"nope\.model"):
        Tokenizer.from_file(missing)


def test_garbage_file(tmp_path: Path) -> None:
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00\xffnot a sentencepiece model\x13\x37" * 20)
    with pytest.raises(TokenizerError, match="not a SentencePiece model") as info:
        Tokenizer.from_file(garbage)
    assert str(garbage) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "tokenizer.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model"):
        Tokenizer.from_file(empty)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path)


def test_from_model_dir_prefers_plain_name(tmp_path: Path, v1_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(v1_path.read_bytes())
    (tmp_path / "tokenizer.model.v3").write_bytes(b"garbage: must not be read")
    assert Tokenizer.from_model_dir(tmp_path).path == tmp_path / "tokenizer.model"


def test_from_model_dir_versioned_name(tmp_path: Path, v1_path: Path) -> None:
    (tmp_path / "tokenizer.model.v1").write_bytes(v1_path.read_bytes())
    tok = Tokenizer.from_model_dir(str(tmp_path))
    assert tok.path == tmp_path / "tokenizer.model.v1"
    assert tok.vocab_size == 32000


def test_from_model_dir_lists_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_model_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in TOKENIZER_FILE_NAMES)


def test_from_model_dir_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="model folder not found"):
        Tokenizer.from_model_dir(tmp_path / "absent")
