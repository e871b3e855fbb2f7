"""``offload-rt serve`` through a real socket with the official ``openai`` client: chat and
completions, streamed and not, give the tokens ``offload-rt generate --json`` gives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from serve_harness import MODEL, Harness, running_server

import offload_rt
from offload_rt.cli import main
from offload_rt.runtime import Runtime

openai = pytest.importorskip("openai")

QUESTION = "What does hacker mean?"
N = 12


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    with offload_rt.load() as runtime:  # the demo model, 4 of 8 experts cached per layer
        yield runtime


@pytest.fixture(scope="module")
def server(rt: Runtime) -> Iterator[Harness]:
    with running_server(rt) as harness:
        yield harness


@pytest.fixture(scope="module")
def client(server: Harness) -> Any:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def generate_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    """``offload-rt generate --json`` on the demo model, greedy."""
    assert main(["generate", *flags, "--max-new-tokens", str(N), "--temperature", "0",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_models_lists_the_served_model(client: Any, rt: Runtime) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_equals_generate_greedy(client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    expected = generate_json(capsys, "--chat", "--prompt", QUESTION)
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=N,
        temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected["text"]
    assert out.choices[0].finish_reason == {"length": "length", "eos": "stop"}[
        expected["finish_reason"]]
    assert out.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert out.usage.completion_tokens == len(expected["token_ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_equals_generate_greedy(client: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    expected = generate_json(capsys, "--chat", "--prompt", QUESTION)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=N,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # streamed piece by piece, not in one go
    assert "".join(pieces) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None
    assert chunks[-1].choices == []  # include_usage: the last chunk carries the usage
    assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
    assert chunks[-1].usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert all(c.usage is None for c in chunks[:-1])


def test_system_and_assistant_turns_go_through_the_template(
        client: Any, capsys: pytest.CaptureFixture[str], rt: Runtime) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": QUESTION}]
    expected = rt.generate(messages=messages, max_new_tokens=N, temperature=0)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N,
                                         temperature=0)
    assert out.choices[0].message.content == expected.text
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_completion_equals_generate_greedy(client: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    expected = generate_json(capsys, "--prompt", "The capital of France is")
    out = client.completions.create(model=MODEL, prompt="The capital of France is",
                                    max_tokens=N, temperature=0)
    assert out.choices[0].text == expected["text"]
    assert out.usage.completion_tokens == len(expected["token_ids"])
    assert out.usage.prompt_tokens == len(expected["prompt_token_ids"])
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is",
                                         max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected["text"]


def test_completion_takes_token_ids(client: Any, rt: Runtime) -> None:
    ids = rt.encode("Once upon a time")
    expected = rt.generate(ids, max_new_tokens=N, temperature=0)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=N, temperature=0)
    assert out.choices[0].text == expected.text


def test_seeded_sampling_repeats_and_stop_strings_end_it(client: Any, rt: Runtime) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "The", "max_tokens": N,
                              "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    expected = rt.generate("The", max_new_tokens=N, temperature=0.9, top_p=0.95, seed=7)
    assert first == expected.text
    stop = first.strip().split(" ")[0]
    stopped = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert stop not in stopped.text and stopped.finish_reason == "stop"


def test_errors_reach_the_client_as_openai_exceptions(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user",
                                                                 "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model=MODEL, prompt="x", n=2)
    assert several.value.param == "n"
