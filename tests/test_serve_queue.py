"""The generation queue of ``offload-rt serve`` on its own, with a scripted generator:
arrival order, the bound, cancelling waiting and running jobs, draining for shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from offload_rt.errors import NumericalError
from offload_rt.server.errors import APIError
from offload_rt.server.jobs import Failed, Finished, GenerationQueue, Job, Piece
from offload_rt.server.metrics import ServerMetrics
from offload_rt.server.prepare import PreparedRequest
from offload_rt.server.requests import GenerationRequest

WAIT_S = 30


@dataclass
class Result:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class ScriptedGenerator:
    """Yields one piece per prompt id; a prompt starting with 0 blocks until ``release``d
    or cancelled (as the runtime, it then ends with finish_reason "cancelled")."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release = threading.Event()
        self._cancel = threading.Event()
        self.last_result: Result | None = None

    def stream(self, prompt: list[int], **kwargs: Any) -> Iterator[str]:
        self._cancel.clear()
        self.started.append(prompt[-1])
        self.last_result = result = Result(len(prompt))
        for token in prompt:
            if token == 0:
                while not (self.release.is_set() or self._cancel.is_set()):
                    self._cancel.wait(0.01)
            if token == 99:
                raise NumericalError("non-finite logits at decode step 1")
            if self._cancel.is_set():
                result.finish_reason = "cancelled"
                return
            result.token_ids.append(token)
            yield f"<{token}>"
        result.finish_reason = "length"

    def cancel(self) -> None:
        self._cancel.set()

    def stats_dict(self, wall_s: float | None = None) -> dict[str, Any]:
        return {"tokens": len(self.last_result.token_ids) if self.last_result else 0}


def job(loop: asyncio.AbstractEventLoop, *ids: int) -> Job:
    request = GenerationRequest(endpoint="completion", model="m", prompt=tuple(ids))
    return Job(PreparedRequest(request, list(ids), 8), loop)


async def drain_events(j: Job) -> list[Any]:
    events = []
    while True:
        event = await asyncio.wait_for(j.next_event(), WAIT_S)
        events.append(event)
        if not isinstance(event, Piece):
            return events


async def until(condition: Any) -> None:
    """Poll ``condition()`` (the worker thread moves on its own) for at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the worker"
        await asyncio.sleep(0.01)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_S * 2))


def test_jobs_run_one_at_a_time_in_arrival_order() -> None:
    async def scenario() -> None:
        gen, loop = ScriptedGenerator(), asyncio.get_running_loop()
        queue = GenerationQueue(gen, max_queue=8, metrics=ServerMetrics())
        blocker = job(loop, 0, 1)
        queue.submit(blocker)
        await until(lambda: gen.started == [1])
        jobs = [job(loop, 5, n) for n in (11, 12, 13, 14)]
        for j in jobs:
            queue.submit(j)
        assert queue.load() == (1, 4)
        gen.release.set()
        assert (await drain_events(blocker))[-1] == Finished("length", 2, 2)
        for j in jobs:
            assert [type(e) for e in await drain_events(j)] == [Piece, Piece, Finished]
        assert gen.started == [1, 11, 12, 13, 14]
        assert queue.close(WAIT_S)

    run(scenario())


def test_beyond_the_bound_is_429_with_retry_after() -> None:
    async def scenario() -> None:
        gen, loop = ScriptedGenerator(), asyncio.get_running_loop()
        queue = GenerationQueue(gen, max_queue=1, metrics=ServerMetrics())
        running, waiting = job(loop, 0, 1), job(loop, 2)
        queue.submit(running)
        await until(lambda: gen.started == [1])
        queue.submit(waiting)
        with pytest.raises(APIError) as full:
            queue.submit(job(loop, 3))
        assert full.value.status == 429 and full.value.code == "queue_full"
        assert int(full.value.headers["Retry-After"]) >= 1
        gen.release.set()
        await drain_events(running)
        await drain_events(waiting)
        queue.submit(job(loop, 4))  # room again
        assert queue.close(WAIT_S)

    run(scenario())


def test_cancel_removes_a_waiting_job_and_stops_the_running_one() -> None:
    async def scenario() -> None:
        gen, loop = ScriptedGenerator(), asyncio.get_running_loop()
        metrics = ServerMetrics()
        queue = GenerationQueue(gen, max_queue=4, metrics=metrics)
        running, waiting, after = job(loop, 7, 0, 1), job(loop, 2), job(loop, 3)
        for j in (running, waiting, after):
            queue.submit(j)
        assert await asyncio.wait_for(running.next_event(), WAIT_S) == Piece("<7>")
        queue.cancel(waiting)
        queue.cancel(running)
        assert (await drain_events(running))[-1] == Finished("cancelled", 3, 1)
        assert (await drain_events(after))[-1] == Finished("length", 1, 1)
        assert gen.started == [1, 3]  # the cancelled waiting job never ran
        assert metrics.snapshot()["generations"]["finish_reasons"] == {"cancelled": 1,
                                                                       "length": 1}
        assert queue.close(WAIT_S)

    run(scenario())


def test_drain_answers_waiting_jobs_503_and_close_cancels_the_running_one() -> None:
    async def scenario() -> None:
        gen, loop = ScriptedGenerator(), asyncio.get_running_loop()
        queue = GenerationQueue(gen, max_queue=4, metrics=ServerMetrics())
        running, waiting = job(loop, 7, 0, 1), job(loop, 2)
        queue.submit(running)
        queue.submit(waiting)
        assert await asyncio.wait_for(running.next_event(), WAIT_S) == Piece("<7>")
        queue.drain()
        (failed,) = await drain_events(waiting)
        assert isinstance(failed, Failed) and failed.error.status == 503
        with pytest.raises(APIError) as refused:
            queue.submit(job(loop, 3))
        assert refused.value.status == 503 and "Retry-After" in refused.value.headers
        assert queue.close(WAIT_S)
        assert (await drain_events(running))[-1].finish_reason == "cancelled"

    run(scenario())


def test_generation_errors_become_events_and_the_worker_goes_on() -> None:
    async def scenario() -> None:
        gen, loop = ScriptedGenerator(), asyncio.get_running_loop()
        queue = GenerationQueue(gen, max_queue=4, metrics=ServerMetrics())
        bad, good = job(loop, 99), job(loop, 1)
        queue.submit(bad)
        queue.submit(good)
        (failed,) = await drain_events(bad)
        assert isinstance(failed, Failed) and failed.error.status == 500
        assert "non-finite" in failed.error.message
        assert (await drain_events(good))[-1] == Finished("length", 1, 1)
        assert queue.close(WAIT_S)

    run(scenario())
