"""StreamDecoder over tokenizer.json tokenizers: the streamed text adds up to transformers'
decode (skip_special_tokens=True) of all ids, and never shows half a character, for byte-level
BPE (one character's bytes split across tokens) and byte-fallback pieces alike."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from checkpoint_factory import mixtral_tokenizer_path
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_json_factory import (
    MIXTRAL_SPECIAL,
    QWEN_SPECIAL,
    byte_level_bpe,
    mixtral_tokenizer_json,
    sentencepiece_style_bpe,
    write_tokenizer_folder,
)
from transformers import PreTrainedTokenizerFast

from offload_rt.stream_decoder import StreamDecoder
from offload_rt.tokenizer import Tokenizer

SAMPLE = "Hello wörld! 東京タワー 😀🚀 👩‍👩‍👧 ✨ naïve — ½ 𝄞 end. <think>x</think>"
KINDS = ("byte_level", "sentencepiece_style", "mixtral")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, tuple[Tokenizer, PreTrainedTokenizerFast]]:
    """(ours, transformers') per kind of tokenizer.json, each fitted to 8 padding ids more."""
    root = tmp_path_factory.mktemp("stream")
    made = {"byte_level": (byte_level_bpe(), QWEN_SPECIAL),
            "sentencepiece_style": (sentencepiece_style_bpe(), MIXTRAL_SPECIAL),
            "mixtral": (mixtral_tokenizer_json(mixtral_tokenizer_path()), MIXTRAL_SPECIAL)}
    out = {}
    for kind, (tk, special) in made.items():
        folder = write_tokenizer_folder(root / kind, tk, special=special)
        ours = Tokenizer.from_model_dir(folder)
        out[kind] = (ours.fit_to_model(ours.piece_count + 8, folder / "config.json"),
                     PreTrainedTokenizerFast.from_pretrained(folder))
    return out


def stream(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(t) for t in ids] + [decoder.flush()]


def reference(ref: PreTrainedTokenizerFast, tok: Tokenizer, ids: Sequence[int]) -> str:
    """transformers' decode; padding ids (past its vocabulary) decode to nothing."""
    return ref.decode([i for i in ids if i < tok.piece_count], skip_special_tokens=True)


def test_split_characters_wait_for_their_last_byte(pairs: dict) -> None:
    tok, ref = pairs["byte_level"]
    ids = tok.encode("東京😀", bos=False)
    chunks = stream(tok, ids)
    assert "".join(chunks) == "東京😀" == reference(ref, tok, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) > 4 and "" in chunks  # some ids end mid-character and show nothing


def test_text_is_out_whenever_the_bytes_so_far_are_whole_characters(pairs: dict) -> None:
    tok, _ = pairs["byte_level"]
    ids = tok.encode("東京😀 ok", bos=False)
    seen, data, whole = "", b"", 0
    for token_id, chunk in zip(ids, stream(tok, ids), strict=False):
        seen, data = seen + chunk, data + (tok.token_bytes(token_id) or b"")
        assert "東京😀 ok".startswith(seen)
        try:
            assert seen == data.decode("utf-8")
            whole += 1
        except UnicodeDecodeError:
            pass  # a character is cut: what is out stops before it
    assert 0 < whole < len(ids)


def test_special_tokens_inside_a_character_are_skipped(pairs: dict) -> None:
    """transformers drops special ids before decoding: bytes on either side still join."""
    tok, ref = pairs["byte_level"]
    ids = tok.encode("東", bos=False)
    assert len(ids) > 1
    mixed = [ids[0], tok.eos_id, tok.piece_count + 1, *ids[1:]]
    assert "".join(stream(tok, mixed)) == reference(ref, tok, mixed) == "東"


def test_byte_fallback_run_is_held_until_it_ends(pairs: dict) -> None:
    """tokenizers' ByteFallback turns a whole run to U+FFFD when one byte is bad, so a valid
    character is shown only once its run has ended."""
    tok, ref = pairs["sentencepiece_style"]
    euro = tok.encode("€", bos=False)[1:]  # three byte pieces
    bad = [*euro, euro[0], *tok.encode("x", bos=False)]  # "€" then a lone lead byte
    chunks = stream(tok, bad)
    assert "".join(chunks) == reference(ref, tok, bad) == "\ufffd" * 4 + " x"
    assert chunks[:4] == ["", "", "", ""]
    good = stream(tok, [*euro, *tok.encode("x", bos=False)])
    assert good[:3] == ["", "", ""] and good[3].startswith("€")


def random_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """Text, split characters, single tokens, special and padding ids."""
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.4:
            word = rng.choice(SAMPLE.split())
            ids += tok.encode(word, bos=False)[: rng.randint(1, 4)]
        elif kind < 0.8:
            ids.append(rng.randrange(tok.piece_count))
        elif kind < 0.9:
            ids.append(rng.choice([i for i in (tok.bos_id, tok.eos_id) if i is not None]))
        else:
            ids.append(rng.randrange(tok.piece_count, tok.vocab_size))
    return ids[:n]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(40))
def test_invariant_random_sequences(pairs: dict, kind: str, seed: int) -> None:
    tok, ref = pairs[kind]
    rng = random.Random(seed)
    ids = random_ids(tok, rng, rng.randint(0, 60))
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == reference(ref, tok, ids)
    assert reference(ref, tok, ids).startswith("".join(chunks[:-1]))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\r"), max_size=40))
def test_invariant_any_text(pairs: dict, kind: str, text: str) -> None:
    tok, ref = pairs[kind]
    ids = tok.encode(text, eos=tok.eos_id is not None)
    chunks = stream(tok, ids)
    assert "".join(chunks) == reference(ref, tok, ids)
    if not tok.decodes_byte_runs_whole:  # else a trailing run of byte pieces waits for flush
        assert chunks[-1] == ""  # valid text never leaves anything held back
    assert "\ufffd" not in "".join(chunks) or "\ufffd" in text


@pytest.mark.parametrize("kind", KINDS)
def test_leading_space_kept_for_a_continuation(pairs: dict, kind: str) -> None:
    """skip_leading_space=False: what the ids add after earlier text."""
    tok, _ = pairs[kind]
    before = tok.encode("Earlier text.")
    for text in ("world", " world", "東京 x"):
        ids = tok.encode(text, bos=False)
        decoder = StreamDecoder(tok, skip_leading_space=False)
        streamed = "".join(decoder.push(t) for t in ids) + decoder.flush()
        assert streamed == tok.decode([*before, *ids])[len(tok.decode(before)):]


def test_linear_work_on_long_byte_level_streams(pairs: dict) -> None:
    tok, _ = pairs["byte_level"]
    calls = []

    class Counting(Tokenizer):
        def decode(self, ids: Sequence[int]) -> str:
            calls.append(len(ids))
            return super().decode(ids)

    counting = Counting(tok._model, tok.vocab_size)
    ids = random_ids(tok, random.Random(0), 5000)
    decoder = StreamDecoder(counting)
    assert "".join(decoder.push(t) for t in ids) + decoder.flush() == tok.decode(ids)
    assert sum(calls) < 20 * len(ids)


def test_padding_id_inside_a_sentencepiece_byte_run_is_skipped() -> None:
    """The same mechanism on a SentencePiece model: decode drops padding ids before decoding,
    so "€" split by a padding id is still "€" (the stream once showed two U+FFFD first)."""
    tok = Tokenizer.from_file(mixtral_tokenizer_path()).fit_to_model(32002, Path("config.json"))
    euro = [tok.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    ids = [euro[0], euro[1], 32001, euro[2]]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "€"
