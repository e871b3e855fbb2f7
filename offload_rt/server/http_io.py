"""The HTTP edges of a request, on Starlette: the body (size limit, JSON), the API key, JSON
replies, and noticing a client that disconnects while its answer is being made.

The size limit is checked here rather than with Starlette's ``max_body_size`` so the 413 is an
OpenAI-shaped JSON error like every other: ``Content-Length`` first, then the bytes as they
arrive (a chunked body has no length).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive

from offload_rt.server.errors import APIError, bad_request
from offload_rt.server.responses import json_bytes

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(json_bytes(obj), status, headers, media_type="application/json")


def error_response(error: APIError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless ``Authorization: Bearer <api_key>`` (nothing to check without a key)."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             api_key.encode()):
        raise APIError(401, "Incorrect API key provided: send the server's --api-key as "
                            "'Authorization: Bearer KEY'", "invalid_request_error", None,
                       "invalid_api_key", {"WWW-Authenticate": "Bearer"})


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON; 413 beyond ``limit`` bytes, 400 for bytes that are not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(None, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"We could not parse the JSON body of your request ({exc}); send a "
                          "JSON object with Content-Type: application/json", None,
                          "invalid_json") from None


def _too_large(size: int | None, limit: int) -> APIError:
    got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return APIError(413, f"the request body is {got}; this server takes at most {limit} bytes "
                         "(--max-body-size)", "invalid_request_error", None,
                    "request_too_large")


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, or ``ClientGone`` as soon as the client disconnects (the body must have
    been read: the next ASGI message is then the disconnect)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
