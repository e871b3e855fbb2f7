"""Errors as an OpenAI-compatible server reports them: a status code and a JSON body

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "context_length_exceeded"}}

(the shape of api.openai.com's errors, which the ``openai`` client turns into
``BadRequestError``, ``NotFoundError``... by status). A client never sees a stack trace: an
unexpected exception becomes a 500 whose message says to look at the server's log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from offload_rt.errors import ContextLengthError, OffloadError, OptionError, TokenizerError

INVALID = "invalid_request_error"


@dataclass(eq=False)  # compared and hashed by identity, as exceptions are
class APIError(Exception):
    """An error answer: HTTP ``status``, OpenAI's ``type``/``param``/``code`` and extra
    response ``headers`` (``Retry-After`` for 429 and 503)."""

    status: int
    message: str
    type: str = INVALID
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 invalid_request_error."""
    return APIError(400, message, INVALID, param, code)


def unsupported(param: str, why: str = "") -> APIError:
    """400 for a parameter that would change the answer and is not implemented."""
    detail = f" ({why})" if why else ""
    return bad_request(f"'{param}' is not supported by offload_rt{detail}; leave it out",
                       param, "unsupported_parameter")


def model_not_found(name: str, served: str) -> APIError:
    """404 model_not_found, as api.openai.com answers a model it does not have."""
    return APIError(404, f"The model '{name}' does not exist: this server runs '{served}' "
                         "(GET /v1/models)", INVALID, "model", "model_not_found")


def internal_error() -> APIError:
    """500 for an exception offload_rt did not raise on purpose (logged with its traceback)."""
    return APIError(500, "internal error while generating; the server's log has the details",
                    "server_error", None, "internal_error")


def from_offload_error(exc: OffloadError, param: str | None = None) -> APIError:
    """The HTTP answer for an error the runtime raised on purpose (its message names the
    field, file or option): the request's fault is 400, the model's or the machine's 500."""
    if isinstance(exc, ContextLengthError):
        return bad_request(str(exc), param, "context_length_exceeded")
    if isinstance(exc, (OptionError, TokenizerError)):
        return bad_request(str(exc), param, "invalid_value")
    # NumericalError, LoaderError, PolicyError, BudgetError...: the model or the machine
    return APIError(500, str(exc), "server_error", None, type(exc).__name__)
