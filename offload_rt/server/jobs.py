"""The generation queue: requests run one at a time, in arrival order, on one worker thread.

A ``Runtime`` runs one generation at a time and is synchronous, so the server hands each
request to a single worker thread through a bounded first-in-first-out queue and the event
loop only awaits the job's events (text pieces, then ``Finished`` or ``Failed``), posted to it
with ``loop.call_soon_threadsafe``: the loop never waits on the model.

* Capacity: the running generation plus ``max_queue`` waiting ones. ``submit`` beyond it
  raises 429 with ``Retry-After`` (about one generation's time, from recent ones); while
  draining (shutdown) it raises 503.
* ``cancel(job)``: a waiting job leaves the queue; the running one is stopped with
  ``Runtime.cancel()`` before its next token (the runtime stays usable). The worker also
  re-checks after each piece, which covers a cancel that came as the job was being started.
* ``drain()`` answers every waiting job 503 and admits no more; ``close()`` also cancels the
  running one and joins the worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from offload_rt.errors import OffloadError
from offload_rt.server.errors import APIError, from_offload_error, internal_error
from offload_rt.server.metrics import ServerMetrics
from offload_rt.server.prepare import PreparedRequest

log = logging.getLogger(__name__)
FIRST_ESTIMATE_S = 1.0  # Retry-After before any generation has been timed
SMOOTHING = 0.3  # weight of the latest generation in the running estimate of one's time


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation. ``finish_reason``: the runtime's (eos, length, stop,
    cancelled)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Piece | Finished | Failed


class Generator(Protocol):
    """What the worker needs of ``offload_rt.Runtime``."""

    last_result: Any

    def stream(self, prompt: list[int], **kwargs: Any) -> Iterator[str]: ...

    def cancel(self) -> None: ...

    def stats_dict(self, wall_s: float | None = None) -> dict[str, Any]: ...


class Job:
    """One request's generation: built on the event loop, run by the worker thread."""

    def __init__(self, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.prepared = prepared
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def post(self, event: Event) -> None:
        """From any thread: hand ``event`` to the coroutine awaiting ``next_event``."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    async def next_event(self) -> Event:
        return await self._events.get()


class GenerationQueue:
    """Bounded FIFO of jobs in front of one worker thread running ``generator``."""

    def __init__(self, generator: Generator, max_queue: int, metrics: ServerMetrics) -> None:
        self.max_queue = max_queue
        self._generator, self._metrics = generator, metrics
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._current: Job | None = None
        self._draining = self._closed = False
        self._generation_s = FIRST_ESTIMATE_S
        self._thread = threading.Thread(target=self._work, name="offload-rt-generate",
                                        daemon=True)  # joined by close(); daemon: a forced
        self._thread.start()                            # exit (second Ctrl-C) never hangs

    # ---- the event loop's side --------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; 429 when the queue is full, 503 while shutting down."""
        with self._cond:
            if self._draining:
                raise self._unavailable()
            if len(self._waiting) + (self._current is not None) > self.max_queue:
                raise APIError(429, f"the server is busy: one generation runs and "
                                    f"{len(self._waiting)} wait (--max-queue {self.max_queue});"
                                    " retry after the Retry-After seconds", "rate_limit_error",
                               None, "queue_full", {"Retry-After": self._retry_after()})
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop ``job`` if it waits, stop it if it runs."""
        with self._cond:
            job.cancelled.set()
            if job in self._waiting:
                self._waiting.remove(job)
            elif self._current is job:
                self._generator.cancel()

    def drain(self) -> None:
        """Shutdown began: answer the waiting jobs 503, admit no more."""
        with self._cond:
            self._draining = True
            dropped = list(self._waiting)
            self._waiting.clear()
        for job in dropped:
            job.post(Failed(self._unavailable()))

    def close(self, timeout_s: float) -> bool:
        """``drain``, cancel the running job, stop the worker; False if it is still running
        after ``timeout_s`` (a read in flight; the runtime frees itself when it ends)."""
        self.drain()
        with self._cond:
            self._closed = True
            if self._current is not None:
                self._current.cancelled.set()
                self._generator.cancel()
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def load(self) -> tuple[int, int]:
        """(running, waiting) generations now."""
        with self._cond:
            return int(self._current is not None), len(self._waiting)

    @property
    def draining(self) -> bool:
        return self._draining

    def _unavailable(self) -> APIError:
        return APIError(503, "the server is shutting down", "service_unavailable", None,
                        "shutting_down", {"Retry-After": self._retry_after()})

    def _retry_after(self) -> str:
        """Whole seconds, about one generation's time (when a place should free up)."""
        return str(min(600, max(1, math.ceil(self._generation_s))))

    # ---- the worker thread ------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._take()) is not None:
            started = time.monotonic()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._current = None
                    elapsed = time.monotonic() - started
                    self._generation_s += SMOOTHING * (elapsed - self._generation_s)

    def _take(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._current = self._waiting.popleft()
            return self._current

    def _run(self, job: Job) -> None:
        g = self._generator
        try:
            for piece in g.stream(prompt=job.prepared.prompt_ids,
                                  **job.prepared.stream_kwargs()):
                job.post(Piece(piece))
                if job.cancelled.is_set():
                    g.cancel()
            result = g.last_result
            end = Finished(result.finish_reason, result.prompt_tokens, len(result.token_ids))
            self._metrics.record_generation(end.finish_reason, g.stats_dict())
            job.post(end)
        except OffloadError as exc:
            log.warning("generation failed: %s", exc)
            job.post(Failed(from_offload_error(exc, job.prepared.request.prompt_param)))
        except Exception:  # logged whole here; the client gets a 500 without the traceback
            log.exception("generation failed")
            job.post(Failed(internal_error()))
