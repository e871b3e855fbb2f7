"""Request bodies of ``offload-rt serve`` checked into ``GenerationRequest`` (no server, no
model): every field honoured, harmless or refused by name; and fitting ``max_tokens``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from offload_rt.generation_config import GenerationDefaults
from offload_rt.server.errors import APIError
from offload_rt.server.prepare import prepare
from offload_rt.server.requests import parse_chat, parse_completion

USER = [{"role": "user", "content": "Hi"}]


def refused(parse: Any, body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == 400
    return caught.value


def test_chat_fields_are_read() -> None:
    r = parse_chat({"model": "m", "messages": USER, "max_completion_tokens": 7,
                    "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 3, "stop": "\n",
                    "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True, "user": "u", "metadata": {"a": "b"}})
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop) == \
        (7, 0.5, 0.9, 0, 3, ("\n",))
    assert r.stream and r.include_usage and r.ignore_eos and r.messages == tuple(USER)


def test_left_out_means_the_models_default() -> None:
    r = parse_chat({"model": "m", "messages": USER})
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop) == (None,) * 6
    assert not r.stream and not r.include_usage and not r.ignore_eos


def test_message_forms() -> None:
    r = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "tool_calls": [], "refusal": None}]})
    assert r.messages == ({"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "a\nb"},
                          {"role": "assistant", "content": "ok"})


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "x", "name": "bob"}, "messages[0].name"),
    ({"role": "user", "content": "x", "colour": 1}, "messages[0].colour"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
     "messages[0].tool_calls"),
    ({"role": "user", "content": [{"type": "input_audio"}]}, "messages[0].content[0].type"),
    ({"role": "user", "content": 5}, "messages[0].content"),
    ({"role": "robot", "content": "x"}, "messages[0].role"),
])
def test_message_parts_the_template_cannot_show_are_refused(message: dict[str, Any],
                                                            param: str) -> None:
    assert refused(parse_chat, {"model": "m", "messages": [message]}).param == param


def test_max_tokens_and_max_completion_tokens_must_agree() -> None:
    assert parse_chat({"model": "m", "messages": USER, "max_tokens": 4,
                       "max_completion_tokens": 4}).max_tokens == 4
    error = refused(parse_chat, {"model": "m", "messages": USER, "max_tokens": 4,
                                 "max_completion_tokens": 5})
    assert error.param == "max_completion_tokens"


@pytest.mark.parametrize(("prompt", "expected"), [
    ("text", "text"), ([1, 2, 3], (1, 2, 3)), (["text"], "text"), ([[1, 2]], (1, 2))])
def test_completion_prompt_forms(prompt: Any, expected: Any) -> None:
    assert parse_completion({"model": "m", "prompt": prompt}).prompt == expected


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"prompt": [1, True]}, "prompt", "invalid_value"),
    ({}, "prompt", "missing_required"),
    ({"prompt": "x", "echo": True}, "echo", "unsupported_parameter"),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"prompt": "x", "logprobs": 2}, "logprobs", "unsupported_parameter"),
    ({"prompt": "x", "n": True}, "n", "unsupported_parameter"),
    ({"prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature", "invalid_value"),
    ({"prompt": "x", "seed": 2**64}, "seed", "invalid_value"),
    ({"prompt": "x", "stream": True, "stream_options": {"continuous": True}},
     "stream_options.continuous", "unrecognized_argument"),
])
def test_completion_refusals_name_the_field(body: dict[str, Any], param: str,
                                            code: str) -> None:
    error = refused(parse_completion, {"model": "m", **body})
    assert (error.param, error.code) == (param, code)


@dataclass
class FakeModel:
    max_seq_len: int = 64
    max_seq_len_source: str = "the model's context"
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    prompt_tokens: int = 10

    def encode(self, prompt: str | Sequence[int] | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None) -> list[int]:
        return list(range(self.prompt_tokens))


def test_max_tokens_left_out_is_the_default_capped_to_the_room_left() -> None:
    request = parse_completion({"model": "m", "prompt": "x"})
    assert prepare(FakeModel(max_seq_len=1000), request).max_new_tokens == 128
    assert prepare(FakeModel(max_seq_len=64), request).max_new_tokens == 54
    file_default = GenerationDefaults(max_new_tokens=20)
    assert prepare(FakeModel(generation_defaults=file_default), request).max_new_tokens == 20


def test_max_tokens_given_must_fit() -> None:
    model = FakeModel(max_seq_len=64)
    assert prepare(model, parse_completion({"model": "m", "prompt": "x",
                                            "max_tokens": 54})).max_new_tokens == 54
    with pytest.raises(APIError) as caught:
        prepare(model, parse_completion({"model": "m", "prompt": "x", "max_tokens": 55}))
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "max_tokens"
    assert "64 tokens" in caught.value.message and "at most 54 fit" in caught.value.message
    with pytest.raises(APIError) as full:
        prepare(FakeModel(max_seq_len=10), parse_completion({"model": "m", "prompt": "x"}))
    assert full.value.code == "context_length_exceeded" and full.value.param == "prompt"


def test_sampling_the_models_file_refuses_is_400() -> None:
    defaults = GenerationDefaults(sampling_only={"min_p": 0.1})
    request = parse_completion({"model": "m", "prompt": "x", "temperature": 0.7})
    with pytest.raises(APIError) as caught:
        prepare(FakeModel(generation_defaults=defaults), request)
    assert caught.value.status == 400 and "min_p" in caught.value.message
    greedy = parse_completion({"model": "m", "prompt": "x", "temperature": 0})
    assert prepare(FakeModel(generation_defaults=defaults), greedy).max_new_tokens == 54
