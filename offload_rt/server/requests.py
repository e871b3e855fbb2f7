"""Request bodies of ``/v1/chat/completions`` and ``/v1/completions`` checked into one
``GenerationRequest`` (no torch, no HTTP library: unit-testable on plain dicts).

Honoured: ``model``, ``messages`` / ``prompt``, ``max_tokens`` (chat: or
``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop``,
``stream``, ``stream_options.include_usage``; and two extensions vLLM also takes: ``top_k``
(0 or -1 = off) and ``ignore_eos``. Harmless (they change no token): ``user``, ``metadata``,
``service_tier``, ``prompt_cache_key``, ``safety_identifier``, ``parallel_tool_calls``.
Refused by name unless null or neutral (``request_fields.check_inert``): ``n`` > 1,
penalties, ``logit_bias``, ``logprobs``, tools and functions, ``response_format`` other than
text, audio, ``echo``, ``best_of``, ``suffix``, ``store: true``... A parameter left out takes
the model's default (``generation_config.json``), as ``offload-rt generate`` does; OpenAI's own
defaults differ (temperature 1), see README "HTTP server".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from offload_rt.request_checks import MAX_SEED
from offload_rt.server import request_fields as f
from offload_rt.server.errors import bad_request
from offload_rt.server.messages import parse_messages

HARMLESS = ("user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
            "parallel_tool_calls")
SAMPLING = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
            "stream_options", "ignore_eos")
COMMON_INERT: dict[str, tuple[Any, ...]] = {
    "n": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
    "store": (False,)}
CHAT_INERT: dict[str, tuple[Any, ...]] = {
    **COMMON_INERT, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (),
    "prediction": (), "reasoning_effort": (), "web_search_options": (), "verbosity": ()}
COMPLETION_INERT: dict[str, tuple[Any, ...]] = {
    **COMMON_INERT, "logprobs": (), "echo": (False,), "best_of": (1,), "suffix": ()}

Endpoint = Literal["chat", "completion"]


@dataclass(frozen=True)
class GenerationRequest:
    """One checked request. ``prompt`` (completions: text or token ids) or ``messages``
    (chat); sampling values None = the model's default; ``stop`` None = the model's."""

    endpoint: Endpoint
    model: str
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt_param(self) -> str:
        """The field that holds the prompt, for error messages."""
        return "messages" if self.endpoint == "chat" else "prompt"


def parse_chat(body: Any) -> GenerationRequest:
    """A ``/v1/chat/completions`` body; 400 ``APIError`` naming the first bad field."""
    body = _object(body)
    f.check_known(body, (*SAMPLING, *HARMLESS, *CHAT_INERT, "messages", "max_completion_tokens"))
    f.check_inert(body, CHAT_INERT)
    if "messages" not in body:
        raise bad_request("Missing required parameter: 'messages'", "messages",
                          "missing_required")
    messages = tuple(parse_messages(body["messages"]))
    max_tokens = f.integer(body, "max_tokens", low=1)
    newer = f.integer(body, "max_completion_tokens", low=1)
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise bad_request(f"max_tokens {max_tokens} and max_completion_tokens {newer} differ; "
                          "give one", "max_completion_tokens", "invalid_value")
    return _common(body, "chat", messages=messages,
                   max_tokens=max_tokens if max_tokens is not None else newer)


def parse_completion(body: Any) -> GenerationRequest:
    """A ``/v1/completions`` body; ``prompt`` is a string or token ids (or a list holding one
    of those: a batch of several prompts is refused)."""
    body = _object(body)
    f.check_known(body, (*SAMPLING, *HARMLESS, *COMPLETION_INERT, "prompt"))
    f.check_inert(body, COMPLETION_INERT)
    return _common(body, "completion", prompt=_prompt(body.get("prompt")),
                   max_tokens=f.integer(body, "max_tokens", low=1))


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object", None, "invalid_type")
    return body


def _common(body: Mapping[str, Any], endpoint: Endpoint, **fields: Any) -> GenerationRequest:
    stream = bool(f.boolean(body, "stream"))
    options = f.object_field(body, "stream_options")
    if options is not None and not stream:
        raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is "
                          "enabled", "stream_options", "invalid_value")
    if options is not None:
        f.check_known(options, ("include_usage",), "stream_options.")
    top_k = f.integer(body, "top_k", low=-1)
    return GenerationRequest(
        endpoint=endpoint, model=f.string(body, "model", required=True) or "", **fields,
        temperature=f.number(body, "temperature", 0.0, 2.0),
        top_p=f.number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=None if top_k is None else max(top_k, 0), seed=f.integer(body, "seed", 0, MAX_SEED),
        stop=f.stop_strings(body), ignore_eos=bool(f.boolean(body, "ignore_eos")),
        stream=stream, include_usage=bool(options and f.boolean(options, "include_usage")))


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string, token ids, or a one-element list of either."""
    if value is None:
        raise bad_request("Missing required parameter: 'prompt'", "prompt", "missing_required")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise bad_request(f"'prompt' holds {len(value)} prompts; this server runs one per "
                          "request", "prompt", "unsupported_parameter")
    raise bad_request("Invalid 'prompt': expected a string, an array of token ids, or an "
                      "array holding one of those", "prompt", "invalid_value")
