"""tokenizer.json folders through the `tokenizers` library, against transformers'
PreTrainedTokenizerFast on the same folder (the oracle): encode, decode, special tokens, which
file wins, and the errors that name a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from checkpoint_factory import mixtral_tokenizer_path
from tokenizer_json_factory import (
    MIXTRAL_SPECIAL,
    QWEN_SPECIAL,
    byte_level_bpe,
    mixtral_tokenizer_json,
    sentencepiece_style_bpe,
    write_tokenizer_folder,
)
from transformers import PreTrainedTokenizerFast

from offload_rt.errors import TokenizerError
from offload_rt.tokenizer import TOKENIZER_FILE_NAMES, Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces  ",
    "Crème brûlée à la française, naïve façade",
    "東京は日本の首都です。中文测试",
    "Emoji: 😀🚀👩‍👩‍👧 and ✨",
    "line one\nline two\ttabbed",
    "<|im_start|>user\nhi<|im_end|> <s>x</s>",
    "x <think>y</think> z",
    "",
]
KINDS = ("byte_level", "sentencepiece_style", "mixtral")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tokenizer.json folder of each kind."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte_level": write_tokenizer_folder(root / "bl", byte_level_bpe(), special=QWEN_SPECIAL),
        "sentencepiece_style": write_tokenizer_folder(root / "sp", sentencepiece_style_bpe(),
                                                      special=MIXTRAL_SPECIAL),
        "mixtral": write_tokenizer_folder(root / "mix",
                                          mixtral_tokenizer_json(mixtral_tokenizer_path()),
                                          special=MIXTRAL_SPECIAL),
    }


def load_both(folder: Path) -> tuple[Tokenizer, PreTrainedTokenizerFast]:
    return Tokenizer.from_model_dir(folder), PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(folders: dict[str, Path], kind: str,
                                              text: str) -> None:
    ours, ref = load_both(folders[kind])
    assert ours.encode(text) == ref(text)["input_ids"]  # post_processor: BOS for Mixtral only
    assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    ids = ours.encode(text, eos=True)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_match_transformers(folders: dict[str, Path], kind: str) -> None:
    ours, ref = load_both(folders[kind])
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert dict(ours.special_tokens) == ref.special_tokens_map
    assert ours.piece_count == len(ref)
    specials = {i for i, t in ref.added_tokens_decoder.items() if t.special}  # skipped in decode
    assert set(ref.all_special_ids) <= specials
    assert {i for i in range(ours.vocab_size) if ours.is_control(i)} == specials
    assert set(ours.control_pieces) == {ref.added_tokens_decoder[i].content for i in specials}


def test_qwen_style_ids(folders: dict[str, Path]) -> None:
    """No BOS; ChatML specials are control; <think> is an added token that prints."""
    tok = Tokenizer.from_model_dir(folders["byte_level"])
    assert tok.bos_id is None and tok.eos_id == tok.piece_to_id("<|im_end|>") == 2
    assert tok.encode("<|im_start|>hi")[0] == tok.piece_to_id("<|im_start|>") == 1
    think = tok.piece_to_id("<think>")
    assert think is not None and not tok.is_control(think)
    assert tok.decode([1, think, 2]) == "<think>"
    assert tok.spelled_markers("<|im_end|> [INST]") == ["[INST]"]  # specials are encoded as such


def test_byte_level_tokens_are_bytes(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_model_dir(folders["byte_level"])
    ids = tok.encode("東京😀", bos=False)
    assert b"".join(tok.token_bytes(i) or b"" for i in ids) == "東京😀".encode()
    assert len(ids) > 3  # some character's bytes are split across tokens
    assert tok.token_bytes(tok.eos_id) is None and tok.byte_value(ids[0]) is None


def test_byte_fallback_pieces(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_model_dir(folders["sentencepiece_style"])
    ids = tok.encode("€", bos=False)  # ▁ <0xE2> <0x82> <0xAC>: no Euro sign in this vocabulary
    assert [tok.byte_value(i) for i in ids[1:]] == [0xE2, 0x82, 0xAC]
    assert tok.token_bytes(ids[1]) == b"\xe2" and tok.token_bytes(ids[0]) is None
    assert tok.decodes_byte_runs_whole and tok.decode(ids) == "€"


def test_mixtral_json_matches_its_sentencepiece_model(folders: dict[str, Path]) -> None:
    """The converted file gives the SentencePiece model's ids for text without specials."""
    json_tok = Tokenizer.from_model_dir(folders["mixtral"])
    sp_tok = Tokenizer.from_file(mixtral_tokenizer_path())
    for text in TEXTS[:6]:
        assert json_tok.encode(text) == sp_tok.encode(text)
        assert json_tok.decode(sp_tok.encode(text)) == sp_tok.decode(sp_tok.encode(text))


def test_tokenizer_json_wins_over_tokenizer_model(folders: dict[str, Path],
                                                  tmp_path: Path) -> None:
    folder = shutil.copytree(folders["mixtral"], tmp_path / "both")
    shutil.copyfile(mixtral_tokenizer_path(), folder / "tokenizer.model")
    assert Tokenizer.from_model_dir(folder).path == folder / "tokenizer.json"
    assert TOKENIZER_FILE_NAMES[0] == "tokenizer.json"
    assert Tokenizer.from_model_dir(folder).encode("<s>") == [1, 1]  # special text recognized


def test_fit_to_model_pads_a_tokenizer_json(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_model_dir(folders["byte_level"])
    fitted = tok.fit_to_model(tok.piece_count + 3, Path("config.json"))
    assert list(fitted.padding_ids) == [tok.piece_count + i for i in range(3)]
    assert fitted.is_control(tok.piece_count) and fitted.is_skipped(tok.piece_count)
    assert fitted.decode([*tok.encode("hi"), tok.piece_count]) == "hi"
    with pytest.raises(TokenizerError, match="pieces but config.json has vocab_size"):
        tok.fit_to_model(tok.piece_count - 1, Path("config.json"))


def test_split_special_tokens_is_honoured(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, byte_level_bpe(), special=QWEN_SPECIAL,
                                    split_special_tokens=True)
    ours, ref = load_both(folder)
    text = "<|im_start|>hi"
    assert ours.encode(text) == ref(text)["input_ids"] and 1 not in ours.encode(text)
    assert ours.spelled_markers(text) == ["<|im_start|>"]


def test_named_token_in_vocabulary_becomes_special(tmp_path: Path) -> None:
    """transformers makes every named special token special, even one the tokenizer.json has
    as an ordinary vocabulary entry."""
    tk = byte_level_bpe()
    word = next(t for t, i in sorted(tk.get_vocab().items(), key=lambda kv: kv[1]) if i == 300)
    folder = write_tokenizer_folder(tmp_path, tk, special={**QWEN_SPECIAL, "pad_token": word})
    ours, ref = load_both(folder)
    assert ours.is_control(300) and ref.pad_token_id == 300
    text = f"a {word} b"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == ref.decode(ours.encode(text), skip_special_tokens=True)


def test_legacy_special_tokens_map(tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, byte_level_bpe(), special={})
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]  # the legacy layout: special tokens in their own file
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "special": True}}))
    ours, ref = load_both(folder)
    assert ours.eos_id == ref.eos_token_id == 0


def test_garbage_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerError, match="is not a tokenizer.json") as info:
        Tokenizer.from_model_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def test_eos_token_missing_from_the_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = write_tokenizer_folder(tmp_path, byte_level_bpe(),
                                    special={"eos_token": "<|eot_id|>"})
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_model_dir(folder)
    assert "field 'eos_token' in" in str(info.value) and "'<|eot_id|>'" in str(info.value)
    assert str(folder / "tokenizer.json") in str(info.value)


def test_cleanup_of_a_non_bpe_tokenizer_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    tk = RustTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    folder = write_tokenizer_folder(tmp_path, tk, special={},
                                    clean_up_tokenization_spaces=True)
    with pytest.raises(TokenizerError, match="clean_up_tokenization_spaces' in .* WordLevel"):
        Tokenizer.from_model_dir(folder)
    bpe = write_tokenizer_folder(tmp_path / "bpe", byte_level_bpe(), special=QWEN_SPECIAL,
                                 clean_up_tokenization_spaces=True)
    ours, ref = load_both(bpe)  # transformers 5 ignores it for BPE, and so do we
    assert ours.decode(ours.encode("a . b")) == ref.decode(ours.encode("a . b")) == "a . b"
