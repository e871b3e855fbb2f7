"""OpenAI's response objects, as plain dicts (API reference: "The chat completion object",
"The chat completion chunk object", "The completion object"; streamed as server-sent events,
each ``data: <json>``, the stream ended by ``data: [DONE]``).

``finish_reason``: the runtime's ``eos`` and ``stop`` (a stop string) are OpenAI's
``"stop"``, ``length`` is ``"length"``. ``usage.prompt_tokens`` counts the encoded prompt
(the chat template's tokens included), ``completion_tokens`` the generated ids (the EOS that
ended the answer excluded, as the runtime reports them).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from offload_rt.server.requests import GenerationRequest

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Reply:
    """The fixed parts of one request's answer: id, creation time, model and kind."""

    request: GenerationRequest
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.request.endpoint == "chat"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created,
                "model": self.model}

    def complete(self, text: str, finish_reason: str, prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
        """The non-streaming answer."""
        reason = FINISH_REASONS[finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text,
                                              "refusal": None},
                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head(False), "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        """One streamed piece (``first``: the chat stream's opening chunk with the role)."""
        reason = FINISH_REASONS[finish_reason] if finish_reason is not None else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        out = {**self._head(True), "choices": [choice]}
        if self.request.include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens,
                                                                   completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def json_bytes(obj: Any) -> bytes:
    """Compact JSON, ASCII-escaped: valid whatever text it carries (an error message may
    quote a lone surrogate a client sent)."""
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` (JSON has no raw newline: one ``data:`` line)."""
    return b"data: " + json_bytes(obj) + b"\n\n"
