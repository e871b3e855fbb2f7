"""StreamDecoder: streamed text must always add up to the tokenizer's decode of all ids."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import mistral_common
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_rt.stream_decoder import StreamDecoder
from offload_rt.tokenizer import Tokenizer

BYTE_IDS = range(3, 259)  # <0x00> .. <0xFF> in the Mixtral v1 vocabulary
SAMPLE_TEXT = "Hello wörld! 東京タワー 😀🚀 👩‍👩‍👧 ✨ naïve — ½ 𝄞 end."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    return Tokenizer.from_file(path)


def stream(tok: Tokenizer, ids: Sequence[int], *, skip_leading_space: bool = True) -> list[str]:
    """Every chunk a streaming client would see, the flush last."""
    decoder = StreamDecoder(tok, skip_leading_space=skip_leading_space)
    return [decoder.push(t) for t in ids] + [decoder.flush()]


def continuation(tok: Tokenizer, ids: Sequence[int]) -> str:
    """What `ids` add to earlier text: the reference for skip_leading_space=False."""
    before = tok.encode("Earlier text.", bos=True)
    return tok.decode([*before, *ids])[len(tok.decode(before)) :]


def test_leading_space_only_at_start(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world", bos=False)  # ▁Hello ▁world
    assert stream(tok, ids) == ["Hello", " world", ""]
    assert stream(tok, [tok.bos_id, *ids]) == ["", "Hello", " world", ""]
    assert stream(tok, ids, skip_leading_space=False) == [" Hello", " world", ""]


def test_multibyte_character_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 𝄞!", bos=False)  # ▁Hi ▁ <0xF0> <0x9D> <0x84> <0x9E> !
    assert [tok.byte_value(i) for i in ids[2:6]] == list("𝄞".encode())
    chunks = stream(tok, ids)
    assert chunks == ["Hi", " ", "", "", "", "𝄞", "!", ""]
    assert "\ufffd" not in "".join(chunks)


def test_incomplete_character_at_end_is_flushed_as_decode_does(tok: Tokenizer) -> None:
    ids = [*tok.encode("ok", bos=False), *[BYTE_IDS[b] for b in "😀".encode()[:3]]]
    chunks = stream(tok, ids)
    assert chunks[:-1] == ["ok", "", "", ""]
    assert chunks[-1] == tok.decode(ids)[len("ok") :] == "\ufffd" * 3


def test_invalid_bytes_do_not_stall_the_stream(tok: Tokenizer) -> None:
    ids = [BYTE_IDS[0x80], BYTE_IDS[0xE2], BYTE_IDS[0x41], *tok.encode("x", bos=False)]
    chunks = stream(tok, ids)
    assert chunks == ["\ufffd", "", "\ufffdA", " x", ""]


def test_control_token_ends_a_byte_run(tok: Tokenizer) -> None:
    ids = [BYTE_IDS[0xE2], BYTE_IDS[0x82], tok.eos_id, BYTE_IDS[0xAC]]
    chunks = stream(tok, ids)
    assert chunks == ["", "", "\ufffd\ufffd", "\ufffd", ""]
    assert "".join(chunks) == tok.decode(ids)


def test_flush_starts_a_fresh_stream(tok: Tokenizer) -> None:
    decoder = StreamDecoder(tok)
    assert decoder.push(tok.encode("Hello", bos=False)[0]) == "Hello"
    assert decoder.flush() == ""
    assert decoder.push(tok.encode("Hello", bos=False)[0]) == "Hello"


def test_out_of_range_id_is_refused_without_corrupting_state(tok: Tokenizer) -> None:
    decoder = StreamDecoder(tok)
    decoder.push(tok.encode("Hi", bos=False)[0])
    with pytest.raises(ValueError, match="outside vocabulary"):
        decoder.push(tok.vocab_size)
    assert decoder.push(tok.encode("Hi there", bos=False)[1]) == " there"


def random_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """A mix of everything a model can emit: text, bytes, controls, unk, any piece."""
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.3:
            ids += tok.encode(rng.choice(SAMPLE_TEXT.split()), bos=False)
        elif kind < 0.6:
            ids += [BYTE_IDS[b] for b in rng.choice(SAMPLE_TEXT).encode()][: rng.randint(1, 4)]
        elif kind < 0.75:
            ids.append(rng.choice(BYTE_IDS))
        elif kind < 0.85:
            ids.append(rng.choice([0, tok.bos_id, tok.eos_id]))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids[:n]


@pytest.mark.parametrize("seed", range(200))
def test_invariant_random_sequences(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    ids = random_ids(tok, rng, rng.randint(0, 60))
    assert "".join(stream(tok, ids)) == tok.decode(ids)
    assert "".join(stream(tok, ids, skip_leading_space=False)) == continuation(tok, ids)


_ids = st.lists(
    st.one_of(
        st.sampled_from(BYTE_IDS),
        st.sampled_from([0, 1, 2, 28705, 22557, 1526]),  # unk, <s>, </s>, ▁, ▁Hello, ▁world
        st.integers(0, 31999),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ids=_ids)
def test_invariant_hypothesis_ids(tok: Tokenizer, ids: list[int]) -> None:
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    # Only the flush may carry U+FFFD from a character cut off at the end.
    text_so_far = "".join(chunks[:-1])
    assert tok.decode(ids).startswith(text_so_far)
    assert "".join(stream(tok, ids, skip_leading_space=False)) == continuation(tok, ids)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_invariant_hypothesis_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert chunks[-1] == ""  # valid text never leaves anything held back
    assert "\ufffd" not in "".join(chunks) or "\ufffd" in text


class CountingTokenizer(Tokenizer):
    """Counts how many ids `decode` is asked to look at."""

    decoded_ids = 0

    def decode(self, ids: Sequence[int]) -> str:
        self.decoded_ids += len(ids)
        return super().decode(ids)


def test_linear_work_on_long_streams(tok: Tokenizer) -> None:
    counting = CountingTokenizer.from_file(tok.path)
    ids = random_ids(tok, random.Random(0), 20_000)
    decoder = StreamDecoder(counting)
    text = "".join(decoder.push(t) for t in ids) + decoder.flush()
    assert text == tok.decode(ids)
    assert counting.decoded_ids < 20 * len(ids)  # O(n^2) would be ~10^8
