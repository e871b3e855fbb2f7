"""The Starlette application: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``, plus ``/health`` (no key needed: a launcher polls it) and ``/metrics``.

Every error is an OpenAI-shaped JSON body with its status (``errors.APIError``); an
exception nobody planned for is logged with its traceback and answered 500 without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from offload_rt.server.errors import APIError, internal_error, model_not_found
from offload_rt.server.http_io import (
    ClientGone,
    check_api_key,
    error_response,
    json_response,
    read_json,
    unless_disconnected,
)
from offload_rt.server.jobs import GenerationQueue, Job, Piece
from offload_rt.server.metrics import ServerMetrics
from offload_rt.server.prepare import prepare
from offload_rt.server.requests import GenerationRequest, parse_chat, parse_completion
from offload_rt.server.responses import Reply
from offload_rt.server.streaming import collect, ending_error, event_stream

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request" (nobody reads it)


@dataclass(frozen=True)
class ServerSettings:
    """``offload-rt serve``'s options besides the runtime's."""

    model_name: str
    api_key: str | None = None
    max_queue: int = 16
    max_body_size: int = 1 << 20
    shutdown_timeout_s: float = 10.0


class Service:
    """One loaded runtime behind the HTTP routes: its queue, metrics and settings."""

    def __init__(self, runtime: Any, settings: ServerSettings) -> None:
        self.runtime, self.settings = runtime, settings
        self.metrics = ServerMetrics()
        self.queue = GenerationQueue(runtime, settings.max_queue, self.metrics)
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None  # set when serving starts

    def begin_shutdown(self) -> None:
        """From any thread, a signal handler included: drain the queue on the event loop
        (a handler must not take the queue's lock: it may interrupt its holder)."""
        if self.loop is None:
            self.queue.drain()
        else:
            self.loop.call_soon_threadsafe(self.queue.drain)

    # ---- small routes -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.queue.draining:
            return json_response({"status": "shutting_down"}, 503)
        return json_response({"status": "ok"})

    async def models(self, request: Request) -> Response:
        check_api_key(request, self.settings.api_key)
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        check_api_key(request, self.settings.api_key)
        name = request.path_params["model"]
        if name != self.settings.model_name:
            raise model_not_found(name, self.settings.model_name)
        return json_response(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "offload_rt", "max_model_len": self.runtime.max_seq_len}

    async def metrics_route(self, request: Request) -> Response:
        check_api_key(request, self.settings.api_key)
        running, waiting = self.queue.load()
        rt = self.runtime
        return json_response({
            "model": self.settings.model_name,
            "queue": {"running": running, "waiting": waiting, "max_queue": self.queue.max_queue,
                      "draining": self.queue.draining},
            **self.metrics.snapshot(),
            "runtime": {"device": str(rt.device), "offloaded": rt.offloaded,
                        "expert_format": rt.expert_format.name, "policy": rt.options.policy,
                        "max_seq_len": rt.max_seq_len}})

    # ---- generation ---------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def _generate(self, request: Request, parse: Callable[[Any], GenerationRequest]
                        ) -> Response:
        try:
            check_api_key(request, self.settings.api_key)
            req = parse(await read_json(request, self.settings.max_body_size))
            if req.model != self.settings.model_name:
                raise model_not_found(req.model, self.settings.model_name)
            prepared = await asyncio.to_thread(prepare, self.runtime, req)
            job = Job(prepared, asyncio.get_running_loop())
        except APIError as error:
            return self._refused(error, "invalid")
        try:
            self.queue.submit(job)
        except APIError as error:
            return self._refused(error, "rejected")
        return await self._answer(request, job, Reply(req, self.settings.model_name))

    async def _answer(self, request: Request, job: Job, reply: Reply) -> Response:
        """The job's answer; a disconnect before it is complete cancels the job."""
        settled = False  # True once the job needs no cancelling
        try:
            if not reply.request.stream:
                body = await unless_disconnected(request.receive, collect(job, reply))
                settled = True
                self.metrics.record_outcome("ok")
                return json_response(body)
            first = await unless_disconnected(request.receive, job.next_event())
            if not isinstance(first, Piece) and (error := ending_error(first)) is not None:
                raise error
            settled = True  # the stream's response cancels it if the client leaves
            return self._stream(job, first, reply)
        except ClientGone:
            self.metrics.record_outcome("cancelled")
            return Response(status_code=CLIENT_CLOSED)
        except APIError as error:
            settled = True  # the job has ended
            return self._refused(error, "rejected" if error.status == 503 else "failed")
        finally:
            if not settled:
                self.queue.cancel(job)  # no-op for a job that has ended

    def _stream(self, job: Job, first: Any, reply: Reply) -> Response:
        outcome: list[str] = []
        body = event_stream(job, first, reply, outcome.append)

        def closed() -> None:  # runs however the response ends, the client's disconnect too
            if not outcome:
                self.queue.cancel(job)
                outcome.append("cancelled")
            self.metrics.record_outcome(outcome[0])

        return EventStreamResponse(body, closed)

    def _refused(self, error: APIError, outcome: str) -> Response:
        self.metrics.record_outcome(outcome)
        return error_response(error)


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose ``on_close`` runs when the response ends, normally or
    because the client disconnected (Starlette then cancels the streaming)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            with contextlib.suppress(RuntimeError):  # a generator that is still running
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def build_app(service: Service) -> Starlette:
    """The ASGI application serving ``service``; its lifespan stops the worker at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.loop = asyncio.get_running_loop()
        yield
        stopped = await asyncio.to_thread(service.queue.close,
                                          service.settings.shutdown_timeout_s)
        if not stopped:
            log.warning("the generation did not stop within %.0f s; exiting anyway",
                        service.settings.shutdown_timeout_s)

    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/metrics", service.metrics_route, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/models/{model:path}", service.model, methods=["GET"]),
        Route("/v1/chat/completions", service.chat, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _unexpected}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 (wrong method) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{exc.detail}: {request.method} {request.url.path}"
    return error_response(APIError(exc.status_code, message, "invalid_request_error", None,
                                   code, dict(exc.headers or {})))


async def _unexpected(request: Request, exc: Exception) -> Response:
    """Any other exception: 500 without details (Starlette re-raises it, so uvicorn logs the
    traceback on the server's side)."""
    return error_response(internal_error())
