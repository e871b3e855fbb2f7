"""Request values through the Python API: seeds in torch's range, stop strings that can match,
temperatures too small for float32, and context errors that say where max_new_tokens came from
and what would fit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from checkpoint_factory import TinySpec, make_hf_checkpoint

import offload_rt
from offload_rt.chat import ChatSession
from offload_rt.errors import CheckpointError, ContextLengthError, OptionError
from offload_rt.generation import GenerationConfig, generate_ids
from offload_rt.generation_config import GenerationDefaults, read_generation_config
from offload_rt.runtime import Runtime
from offload_rt.sampling import Sampler, SamplingConfig

MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=32000, tokenizer=True, hidden_size=16, intermediate_size=16,
                    num_heads=2, num_kv_heads=1)
    return make_hf_checkpoint(tmp_path_factory.mktemp("request_model"), spec)


@pytest.fixture(scope="module")
def rt(model_dir: Path) -> Iterator[Runtime]:
    with offload_rt.load(model_dir) as runtime:
        yield runtime


# ---- seeds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [MAX_SEED + 1, -1, 10**30])
def test_seed_outside_the_generator_range_is_an_option_error(rt: Runtime, seed: int) -> None:
    with pytest.raises(OptionError, match=rf"^seed {seed} is outside 0\.\.{MAX_SEED} "):
        SamplingConfig(temperature=1.0, seed=seed)
    with pytest.raises(OptionError, match=rf"^seed {seed} is outside"):  # not ValueError: Overflow
        rt.generate("hi", max_new_tokens=2, temperature=1.0, seed=seed)
    logits = torch.randn(50)  # the range's ends still sample, reproducibly
    for edge in (0, MAX_SEED):
        first, again = (Sampler(SamplingConfig(temperature=1.0, seed=edge)) for _ in range(2))
        assert first.sample(logits) == again.sample(logits)


# ---- stop strings -------------------------------------------------------------------------------


def test_stop_string_with_a_lone_surrogate_is_refused(rt: Runtime) -> None:
    with pytest.raises(OptionError, match=r"^stop\[1\]: not valid UTF-8 text: byte 0xff at byte "
                                          r"offset 2 \(after 'ab'\)"):
        rt.generate("hi", max_new_tokens=2, stop=["ok", "ab\udcff"])
    with pytest.raises(OptionError, match=r"^stop\[0\]: not valid UTF-8 text: lone surrogate "
                                          "U\\+D800"):
        GenerationConfig(stop=("\ud800",))


def test_stop_strings_in_generation_config_are_checked(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text('{"stop_strings": ["ok", "\\ud800"]}')
    with pytest.raises(CheckpointError, match=r"generation_config.json: field 'stop_strings'\[1\]: "
                                              "not valid UTF-8 text: lone surrogate U\\+D800"):
        read_generation_config(tmp_path)


# ---- temperatures below float32's range ---------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_temperature_too_small_for_float32_samples_the_maximum(temperature: float) -> None:
    logits = torch.tensor([1.0, 2.0, 1.5, float("-inf")])
    sampler = Sampler(SamplingConfig(temperature=temperature, seed=0))
    probs = sampler.probabilities(logits)
    assert probs.dtype == torch.float32 and probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert [sampler.sample(logits) for _ in range(5)] == [1] * 5


def test_tiny_temperature_from_generation_config_generates(rt: Runtime, model_dir: Path,
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "tiny_t"
    folder.mkdir()
    for item in model_dir.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 1e-300, "top_k": 0}))
    greedy = rt.generate("The sky", max_new_tokens=5, temperature=0, ignore_eos=True)
    with offload_rt.load(folder) as tiny:
        out = tiny.generate("The sky", max_new_tokens=5, ignore_eos=True)
    assert out.token_ids == greedy.token_ids  # before: RuntimeError, inf/nan probabilities


# ---- where max_new_tokens came from -------------------------------------------------------------


class FakeModel:
    max_seq_len = 16

    def reset(self) -> None: ...

    def forward(self, token_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        return torch.zeros(token_ids.numel(), 8)


def test_context_error_names_the_source_of_max_new_tokens() -> None:
    config = GenerationConfig(max_new_tokens=20,
                              max_new_tokens_source="max_new_tokens in /m/generation_config.json")
    with pytest.raises(ContextLengthError) as info:
        generate_ids(FakeModel(), [1, 2, 3], config, eos_id=None, max_seq_len_source="the model's")
    assert str(info.value) == (
        "prompt of 3 tokens + max_new_tokens 20 (from max_new_tokens in /m/generation_config.json"
        "; --max-new-tokens N (API: max_new_tokens=N) overrides it) = 23 exceeds the context "
        "length (max_seq_len) of 16 (the model's); shorten the prompt or lower max_new_tokens "
        "(at most 13 fit after this prompt)")
    with pytest.raises(ContextLengthError, match="shorten the prompt: it alone fills the context"):
        generate_ids(FakeModel(), list(range(16)), GenerationConfig(max_new_tokens=1),
                     eos_id=None)


def test_new_tokens_source_follows_new_tokens() -> None:
    path = Path("/m/generation_config.json")
    assert GenerationDefaults(path, max_new_tokens=300).new_tokens_source(None) == \
        f"max_new_tokens in {path}"
    assert GenerationDefaults(path, max_length=300).new_tokens_source(None) == \
        f"max_length 300 in {path}, minus the prompt"
    assert GenerationDefaults().new_tokens_source(None) == \
        "offload_rt's default, DEFAULT_MAX_NEW_TOKENS = 128"
    assert GenerationDefaults(path, max_new_tokens=300).new_tokens_source(5) == ""


def test_chat_answer_budget_names_its_source_and_what_fits(rt: Runtime) -> None:
    with pytest.raises(ContextLengthError) as info:
        ChatSession(rt, max_new_tokens=300, max_new_tokens_source="chat's default (300)")
    assert str(info.value) == (
        "max_new_tokens 300 leaves no room for a question in the context of 256 tokens "
        f"({rt.max_seq_len_source}); 300 is chat's default (300): pass a smaller one, below 256 "
        "(--max-new-tokens N; API: max_new_tokens=N)")  # before: "or raise max_seq_len"


def test_sampling_refusal_says_who_chose_to_sample() -> None:
    defaults = GenerationDefaults(Path("/m/generation_config.json"), do_sample=True,
                                  sampling_only={"min_p": 0.1})
    with pytest.raises(OptionError) as info:
        defaults.sampling(None, None, None)
    assert str(info.value) == (
        "/m/generation_config.json: min_p 0.1 shapes sampling and offload_rt does not implement "
        "it; this request samples (temperature 1, the file's do_sample True): pass "
        "--temperature 0 (API: temperature=0) to generate greedily, or remove min_p from the "
        "file")
    assert defaults.sampling(0.0, None, None) == (0.0, 50, 1.0)


def test_generate_context_error_names_generation_config(tmp_path: Path) -> None:
    """A model whose generation_config.json asks for more new tokens than its context holds:
    the error of a request that did not give max_new_tokens names that file."""
    model = make_hf_checkpoint(tmp_path, TinySpec(max_position_embeddings=64))
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 300}))
    with offload_rt.load(model) as rt, pytest.raises(ContextLengthError) as info:
        rt.generate([1, 2, 3])
    message = str(info.value)
    assert "max_new_tokens in " in message and "generation_config.json" in message, message
    assert "--max-new-tokens" in message
