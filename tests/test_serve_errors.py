"""``offload-rt serve``'s errors through raw HTTP: OpenAI-shaped JSON with the right status,
never a stack trace; the body size limit; the API key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_harness import MODEL, WAIT_S, Harness, running_server

import offload_rt
from offload_rt.cli import build_parser
from offload_rt.runtime import Runtime

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    with offload_rt.load() as runtime:
        yield runtime


@pytest.fixture(scope="module")
def server(rt: Runtime) -> Iterator[Harness]:
    with running_server(rt, max_body_size=4096) as harness:
        yield harness


def post(server: Harness, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, timeout=WAIT_S, **kwargs)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error answer with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"[1, 2]", "invalid_type"),
    (b"", "invalid_json"),
])
def test_bad_json_is_400(server: Harness, body: bytes, code: str) -> None:
    assert error_of(post(server, CHAT, body), 400)["code"] == code


def test_unknown_model_is_404_model_not_found(server: Harness) -> None:
    error = error_of(post(server, CHAT, {"model": "gpt-4o", "messages": USER}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-4o" in error["message"] and MODEL in error["message"]
    error = error_of(httpx.get(server.v1 + "/models/gpt-4o", timeout=WAIT_S), 404)
    assert error["code"] == "model_not_found"


def test_missing_model_is_400(server: Harness) -> None:
    assert error_of(post(server, CHAT, {"messages": USER}), 400)["param"] == "model"


def test_too_many_tokens_requested_names_the_numbers(server: Harness, rt: Runtime) -> None:
    prompt_tokens = len(rt.encode(messages=USER))
    error = error_of(post(server, CHAT, {"model": MODEL, "messages": USER, "max_tokens": 600}),
                     400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    room = rt.max_seq_len - prompt_tokens
    for number in (rt.max_seq_len, prompt_tokens + 600, prompt_tokens, room):
        assert str(number) in error["message"]


def test_prompt_longer_than_the_context_is_400(server: Harness, rt: Runtime) -> None:
    ids = list(range(5, 5 + rt.max_seq_len))
    error = error_of(post(server, "/v1/completions", {"model": MODEL, "prompt": ids}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert str(rt.max_seq_len) in error["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("n", 2), ("logprobs", True), ("tools", [{"type": "function"}]), ("presence_penalty", 0.5),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10})])
def test_fields_that_change_the_answer_are_refused_by_name(server: Harness, field: str,
                                                          value: Any) -> None:
    error = error_of(post(server, CHAT, {"model": MODEL, "messages": USER, field: value}), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"


def test_neutral_values_and_harmless_fields_pass(server: Harness) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 2, "n": 1, "logprobs": False,
            "presence_penalty": 0, "tools": [], "response_format": {"type": "text"},
            "user": "someone"}
    assert post(server, CHAT, body).status_code == 200


def test_unknown_field_is_400_naming_it(server: Harness) -> None:
    error = error_of(post(server, CHAT, {"model": MODEL, "messages": USER, "temprature": 0}),
                     400)
    assert error["param"] == "temprature" and error["code"] == "unrecognized_argument"


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 3}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"), ({"top_p": 0}, "top_p"), ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_values_are_400_naming_the_field(server: Harness, body: dict[str, Any],
                                             param: str) -> None:
    request = {"model": MODEL, "messages": USER, **body}
    assert error_of(post(server, CHAT, request), 400)["param"] == param


def test_template_errors_are_400(server: Harness) -> None:
    messages = [{"role": "assistant", "content": "first"}]
    error = error_of(post(server, CHAT, {"model": MODEL, "messages": messages}), 400)
    assert error["param"] == "messages" and "messages[0]" in error["message"]
    lone = b'{"model": "demo", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    assert "UTF-8" in error_of(post(server, CHAT, lone), 400)["message"]


def test_body_over_the_limit_is_413(server: Harness) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert error_of(post(server, CHAT, big), 413)["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(server: Harness) -> None:
    """No Content-Length: the bytes are counted as they arrive."""
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "demo", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = httpx.post(server.url + CHAT, content=chunks(), timeout=WAIT_S)
    assert "content-length" not in response.request.headers
    error = error_of(response, 413)
    assert error["code"] == "request_too_large"
    # was "the request body is more; this server takes at most ..."
    assert error["message"].startswith("the request body is more than "), error["message"]


def test_unknown_route_and_method_are_openai_shaped(server: Harness) -> None:
    assert error_of(httpx.get(server.url + "/v1/nothing", timeout=WAIT_S), 404)["code"] \
        == "not_found"
    assert error_of(httpx.get(server.url + CHAT, timeout=WAIT_S), 405)["code"] \
        == "method_not_allowed"


def test_unexpected_exception_is_500_without_a_trace(server: Harness, rt: Runtime,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Iterator[str]:
        raise RuntimeError("secret internal detail")

    for where in ("stream", "encode"):  # in the worker thread; in the request's handler
        monkeypatch.setattr(rt, where, broken)
        for stream in (False, True):
            response = post(server, CHAT, {"model": MODEL, "messages": USER, "stream": stream})
            error = error_of(response, 500)
            assert "secret" not in response.text and error["type"] == "server_error"
        monkeypatch.undo()
    assert post(server, CHAT, {"model": MODEL, "messages": USER, "max_tokens": 2}) \
        .status_code == 200


def test_api_key(rt: Runtime) -> None:
    with running_server(rt, api_key="s3cret") as server:
        ok = {"model": MODEL, "messages": USER, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = error_of(post(server, CHAT, ok, headers=headers), 401)
            assert error["code"] == "invalid_api_key" and "s3cret" not in error["message"]
            assert error_of(httpx.get(server.v1 + "/models", headers=headers,
                                      timeout=WAIT_S), 401)["code"] == "invalid_api_key"
        assert post(server, CHAT, ok, headers=server.auth()).status_code == 200
        assert httpx.get(server.url + "/health", timeout=WAIT_S).json() == {"status": "ok"}


def test_listens_on_loopback_only_by_default() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
