"""A job's events turned into the answer: one JSON object, or server-sent events as the
pieces come (no HTTP library here: ``app`` wraps these in Starlette responses).

A stream starts only once the job's first event has arrived, so an error found when the
generation starts still gets its own status code; after that an error is sent as an
``{"error": ...}`` event followed by ``[DONE]`` (what vLLM sends; the ``openai`` client
raises it as ``APIError``). A generation the server cancels while shutting down ends the
same way (503), never as a complete-looking answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from offload_rt.server.errors import APIError
from offload_rt.server.jobs import Event, Failed, Finished, Job, Piece
from offload_rt.server.responses import DONE, Reply, sse

SHUT_DOWN = APIError(503, "the server shut down during this generation; retry",
                     "service_unavailable", None, "shutting_down")


def ending_error(event: Finished | Failed) -> APIError | None:
    """The error a final event stands for (None: a normal end)."""
    if isinstance(event, Failed):
        return event.error
    return SHUT_DOWN if event.finish_reason == "cancelled" else None


async def collect(job: Job, reply: Reply) -> dict[str, Any]:
    """The non-streaming answer; raises the job's ``APIError`` if it failed."""
    texts, event = [], await job.next_event()
    while isinstance(event, Piece):
        texts.append(event.text)
        event = await job.next_event()
    error = ending_error(event)
    if error is not None:
        raise error
    assert isinstance(event, Finished)
    return reply.complete("".join(texts), event.finish_reason, event.prompt_tokens,
                          event.completion_tokens)


async def event_stream(job: Job, first: Event, reply: Reply,
                       ended: Callable[[str], None]) -> AsyncIterator[bytes]:
    """The SSE body; calls ``ended("ok")`` or ``ended("failed")`` when the answer is
    complete (a stream left before that was the client's disconnect)."""
    if reply.chat:
        yield sse(reply.chunk(first=True))
    event = first
    while isinstance(event, Piece):
        yield sse(reply.chunk(event.text))
        event = await job.next_event()
    error = ending_error(event)
    if error is not None:
        yield sse(error.body())
        yield DONE
        ended("failed")
        return
    assert isinstance(event, Finished)
    yield sse(reply.chunk(finish_reason=event.finish_reason))
    if reply.request.include_usage:
        yield sse(reply.usage_chunk(event.prompt_tokens, event.completion_tokens))
    yield DONE
    ended("ok")
