"""Tokenizer vs model vocabulary: refused at load when the tokenizer is larger; a padded model
vocabulary (more embedding rows than pieces) loads, and its padding ids are never sampled
(except an EOS id) and decode to nothing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mistral_common
import pytest
import torch
from checkpoint_factory import (
    TinySpec,
    make_hf_checkpoint,
    make_mistral_checkpoint,
    mixtral_tokenizer_path,
    read_safetensors,
)
from safetensors.torch import save_file

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import OffloadError, TokenIdError, TokenizerError
from offload_rt.stream_decoder import StreamDecoder
from offload_rt.tokenizer import Tokenizer

SMALL = {"hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "num_kv_heads": 1}
PIECES, ROWS = 32000, 32002  # Mixtral v1 tokenizer; a fine-tune's padded embedding
PROMPT = "The capital of France is"
V3_TOKENIZER = "mistral_instruct_tokenizer_240323.model.v3"  # 32768 pieces


def _padded_model(out: Path, boosted: dict[int, float] | None = None,
                  eos: int | None = None) -> Path:
    """A 32002-row model with the 32000-piece tokenizer.

    ``boosted``: lm_head rows set to that multiple of the row of the token the model would pick
    first for PROMPT, so those ids win greedy decoding unless they are masked. ``eos`` is
    written to config.json and generation_config.json.
    """
    model = make_hf_checkpoint(out, TinySpec(vocab_size=ROWS, **SMALL))
    shutil.copyfile(mixtral_tokenizer_path(), model / "tokenizer.model")
    if boosted:
        with offload_rt.load(model) as rt:
            first = rt.generate(PROMPT, max_new_tokens=1, ignore_eos=True).token_ids[0]
        path = model / "model.safetensors"
        metadata, tensors = read_safetensors(path)
        head = tensors["lm_head.weight"].clone()
        for token_id, factor in boosted.items():
            head[token_id] = factor * head[first]
        tensors["lm_head.weight"] = head
        save_file(tensors, path, metadata)
    if eos is not None:
        for name in ("config.json", "generation_config.json"):
            cfg = json.loads((model / name).read_text())
            cfg["eos_token_id"] = eos
            (model / name).write_text(json.dumps(cfg))
    return model


@pytest.fixture(scope="module")
def boosted_pad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Padding id 32001 has 50x the logit of the model's first choice."""
    return _padded_model(tmp_path_factory.mktemp("pad"), boosted={ROWS - 1: 50.0})


@pytest.fixture(scope="module")
def padding_eos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EOS is padding id 32000 (as in fine-tunes whose added end-of-turn token is EOS), boosted."""
    return _padded_model(tmp_path_factory.mktemp("pad_eos"), boosted={PIECES: 50.0}, eos=PIECES)


# ---- tokenizer larger than the model: refused at load ------------------------------------------


@pytest.mark.parametrize("make", [make_hf_checkpoint, make_mistral_checkpoint])
def test_tokenizer_larger_than_the_model_is_refused_at_load(tmp_path: Path, make,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    model = make(tmp_path, TinySpec(vocab_size=PIECES, **SMALL))
    v3 = Path(mistral_common.__file__).parent / "data" / V3_TOKENIZER
    shutil.copyfile(v3, model / "tokenizer.model")
    config = "config.json" if make is make_hf_checkpoint else "params.json"
    with pytest.raises(TokenizerError) as info:
        offload_rt.load(model)
    capsys.readouterr()  # drop save_pretrained's progress bar
    message = str(info.value)
    assert str(model / "tokenizer.model") in message and "32768 pieces" in message
    assert str(model / config) in message and "vocab_size 32000" in message
    code = main(["generate", str(model), "--prompt", PROMPT, "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("offload-rt: error: ") and "32768 pieces" in err


# ---- model larger than the tokenizer: padding ids ------------------------------------------------


def test_padded_vocabulary_loads_with_a_log_line(boosted_pad: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="offload_rt"), offload_rt.load(boosted_pad) as rt:
        assert (rt.tokenizer.vocab_size, rt.tokenizer.piece_count) == (ROWS, PIECES)
        assert list(rt.tokenizer.padding_ids) == [PIECES, ROWS - 1]
    lines = [r.getMessage() for r in caplog.records if "have no text" in r.getMessage()]
    assert len(lines) == 1 and "the 2 ids 32000..32001" in lines[0]


def test_padding_id_is_never_sampled(boosted_pad: Path) -> None:
    with offload_rt.load(boosted_pad) as rt:
        logits = rt.model(torch.tensor(rt.encode(PROMPT)), 0, last_only=True)[-1]
        assert int(torch.argmax(logits)) == ROWS - 1  # unmasked, the padding id would win
        greedy = rt.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        sampled = rt.generate(PROMPT, max_new_tokens=4, ignore_eos=True, temperature=1.0, seed=0)
    for out in (greedy, sampled):
        assert len(out.token_ids) == 4 and max(out.token_ids) < PIECES
    assert greedy.token_ids[0] == int(torch.argmax(logits[:PIECES]))


def test_eos_beyond_the_tokenizer_still_stops(padding_eos: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with offload_rt.load(padding_eos) as rt:
        out = rt.generate(PROMPT, max_new_tokens=4)
        assert (out.token_ids, out.finish_reason) == ([], "eos")
        past = rt.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
    assert past.token_ids[0] == PIECES and past.finish_reason == "length"
    assert "[PAD" not in past.text  # the EOS decodes to nothing, like </s>
    code = main(["generate", str(padding_eos), "--prompt", PROMPT, "--max-new-tokens", "3",
                 "--ignore-eos"])
    assert code == 0, capsys.readouterr().err


def test_prompt_ids_may_use_padding_ids_but_not_ids_past_the_model(
        boosted_pad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", str(boosted_pad), "--prompt-ids", f"1,{ROWS - 1}",
                 "--max-new-tokens", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["prompt_token_ids"] == [1, ROWS - 1]
    for bad in (str(ROWS), "99999"):
        code = main(["generate", str(boosted_pad), "--prompt-ids", f"1,{bad}",
                     "--max-new-tokens", "1"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("offload-rt: error: ")
        assert bad in err and f"vocab_size {ROWS}" in err


# ---- the tokenizer's own view -------------------------------------------------------------------


@pytest.fixture(scope="module")
def padded() -> Tokenizer:
    tok = Tokenizer.from_file(mixtral_tokenizer_path())
    return tok.fit_to_model(ROWS, Path("config.json"))


def test_padding_ids_decode_to_nothing(padded: Tokenizer) -> None:
    ids = padded.encode("Hello", bos=False)
    assert padded.decode([*ids, PIECES, ROWS - 1, *ids]) == "Hello Hello"
    assert padded.is_control(PIECES) and padded.byte_value(PIECES) is None
    assert padded.piece(ROWS - 1) == "[PAD32001]"
    decoder = StreamDecoder(padded)
    text = "".join(decoder.push(i) for i in [*ids, ROWS - 1, *ids]) + decoder.flush()
    assert text == "Hello Hello"


def test_ids_past_the_vocabulary_are_an_offload_error(padded: Tokenizer) -> None:
    with pytest.raises(TokenIdError, match=f"token id {ROWS} outside vocabulary") as info:
        padded.decode([1, ROWS])
    assert isinstance(info.value, OffloadError) and isinstance(info.value, ValueError)
    unpadded = Tokenizer.from_file(mixtral_tokenizer_path())
    with pytest.raises(OffloadError, match=str(PIECES)):
        StreamDecoder(unpadded).push(PIECES)
