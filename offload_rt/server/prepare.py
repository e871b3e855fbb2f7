"""A checked request made ready to queue: its prompt encoded and its length fitted to the
context, so a request that cannot run is answered at once (400) instead of after its wait.

``max_tokens`` left out takes the model's default (``generation_config.json``, else 128),
shortened to what fits after the prompt: as api.openai.com, an unspecified length is bounded
by the context, not an error. Given, it must fit: 400 ``context_length_exceeded`` with the
numbers otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from offload_rt.errors import OffloadError
from offload_rt.generation_config import GenerationDefaults
from offload_rt.server.errors import bad_request, from_offload_error
from offload_rt.server.requests import GenerationRequest


class Model(Protocol):
    """What preparing needs of ``offload_rt.Runtime`` (no model compute: safe to call while
    the worker thread generates)."""

    max_seq_len: int
    max_seq_len_source: str
    generation_defaults: GenerationDefaults

    def encode(self, prompt: str | Sequence[int] | None = None, *,
               messages: Sequence[Mapping[str, str]] | None = None) -> list[int]: ...


@dataclass(frozen=True)
class PreparedRequest:
    """``request`` with its prompt ids and the number of tokens it may generate."""

    request: GenerationRequest
    prompt_ids: list[int]
    max_new_tokens: int

    def stream_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Runtime.stream`` (with ``prompt=self.prompt_ids``)."""
        r = self.request
        return {"max_new_tokens": self.max_new_tokens, "temperature": r.temperature,
                "top_k": r.top_k, "top_p": r.top_p, "seed": r.seed, "stop": r.stop,
                "ignore_eos": r.ignore_eos}


def prepare(model: Model, request: GenerationRequest) -> PreparedRequest:
    """Encode and fit ``request``; ``APIError`` (400) when it cannot run on ``model``."""
    param = request.prompt_param
    try:
        if request.messages is not None:
            ids = model.encode(messages=request.messages)
        else:
            ids = model.encode(request.prompt)
        defaults = model.generation_defaults
        defaults.sampling(request.temperature, request.top_k, request.top_p)  # refusals only
        n = fit_max_tokens(len(ids), request.max_tokens, defaults, model, param)
    except OffloadError as exc:
        raise from_offload_error(exc, param) from None
    return PreparedRequest(request, ids, n)


def fit_max_tokens(prompt_tokens: int, requested: int | None, defaults: GenerationDefaults,
                   model: Model, param: str) -> int:
    """The tokens to generate: ``requested``, or the model's default capped to the room left.

    ``ContextLengthError`` from ``defaults`` (a ``max_length`` the prompt fills) passes on."""
    limit = model.max_seq_len
    room = limit - prompt_tokens
    context = (f"This model's maximum context length is {limit} tokens (max_seq_len: "
               f"{model.max_seq_len_source})")
    if room < 1:
        raise bad_request(f"{context}; the {param} take {prompt_tokens} tokens, leaving no "
                          f"room for an answer; shorten the {param}", param,
                          "context_length_exceeded")
    if requested is None:
        return min(defaults.new_tokens(None, prompt_tokens), room)
    if requested > room:
        raise bad_request(f"{context}; you requested {prompt_tokens + requested} tokens "
                          f"({prompt_tokens} in the {param}, {requested} for the completion): "
                          f"lower max_tokens (at most {room} fit after this {param}) or shorten "
                          f"the {param}", "max_tokens", "context_length_exceeded")
    return requested
