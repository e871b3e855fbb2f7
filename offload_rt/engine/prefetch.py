"""Router-predicted prefetch: guess later layers' experts and load them in the background.

At layer l of a decode step, layer l+j's gate is applied (after l+j's own norm) to the residual
stream entering layer l's MoE; its top-k experts replace what is queued for the background
threads, which load them into free or evictable slots while layer l computes. A prefill chunk
(many tokens) queues the union of its tokens' top-k for the next layers, in the order the layer
will take them, as many as the layer's cache holds: prefill needs most experts of every layer, so the disk reads
layer l+1's while layer l computes (time to first token). The worker never evicts what the
current layer needs (pinned or protected keys), never waits for a slot (best effort), and hands
any failure back to the caller through the engine. The thread holds no strong reference to the
engine (``weakref``): dropping the engine ends it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence

import torch

from cache_policies import ExpertKey
from offload_rt.model.norm import RMSNorm
from offload_rt.model.router import Router

# prefetch threads, each with one read in flight (benchmarks/results/mixtral_8x7b_ab.json);
# the host memory their reads use is planned in work_memory.READERS
PREFETCH_READERS = 2


class NextLayerPredictor:
    """Applies later layers' norms and gates (resident) to the current hidden state."""

    def __init__(self, norms: Sequence[RMSNorm], routers: Sequence[Router], top_k: int) -> None:
        self.norms, self.routers, self.top_k = list(norms), list(routers), top_k

    @torch.inference_mode()
    def predict(self, layer: int, hidden: torch.Tensor,
                depth: int) -> tuple[list[ExpertKey], dict[ExpertKey, float]]:
        """hidden: [1, H]. Returns (keys to load, nearest layer first; scores of all experts)."""
        to_load: list[ExpertKey] = []
        scores: dict[ExpertKey, float] = {}
        for j in range(layer + 1, min(layer + 1 + depth, len(self.routers))):
            probs = self.routers[j].probabilities(self.norms[j](hidden))[0]  # [E]
            for e, p in enumerate(probs.tolist()):
                scores[ExpertKey(j, e)] = p
            top = torch.topk(probs, self.top_k).indices.tolist()
            to_load.extend(ExpertKey(j, e) for e in top)
        return to_load, scores

    @torch.inference_mode()
    def predict_prefill(self, layer: int, hidden: torch.Tensor, depth: int,
                        capacity: Callable[[int], int]) -> list[ExpertKey]:
        """hidden: [T, H], T > 1 (a prefill chunk). Returns the keys to load for the next
        ``depth`` layers, nearest layer first: per layer j, the union of every token's top-k in
        ascending expert id (the order ``MoELayer`` takes them in), at most ``capacity(j)`` of
        them (what layer j's cache can hold at once: a later one would evict an earlier one
        before it is used; pools may differ in size between layers)."""
        to_load: list[ExpertKey] = []
        for j in range(layer + 1, min(layer + 1 + depth, len(self.routers))):
            probs = self.routers[j].probabilities(self.norms[j](hidden))  # [T, E]
            top = torch.topk(probs, self.top_k, dim=-1).indices
            used = torch.unique(top).tolist()[:capacity(j)]  # sorted ascending
            to_load.extend(ExpertKey(j, e) for e in used)
        return to_load


class _Queue:
    """What the thread shares with its worker: keys, flags and the engine's condition, and
    nothing that leads back to the engine, so a dropped engine is freed and its thread ends."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.keys: deque[ExpertKey] = deque()
        self.stop = False
        self.busy = 0  # threads loading a key now


def _stop(queue: _Queue) -> None:
    with queue.cond:
        queue.stop = True
        queue.keys.clear()
        queue.cond.notify_all()


def _load(load_one: weakref.WeakMethod, key: ExpertKey) -> bool:
    """Call the engine's ``load_one`` if the engine still exists; the strong reference dies
    with this frame, so an idle thread holds none."""
    fn = load_one()
    if fn is None:
        return False
    fn(key)
    return True


def _run(queue: _Queue, load_one: weakref.WeakMethod) -> None:
    while True:
        with queue.cond:
            while not queue.keys and not queue.stop:
                queue.cond.wait()
            if queue.stop:
                return
            key = queue.keys.popleft()
            queue.busy += 1
        try:
            alive = _load(load_one, key)
        finally:
            with queue.cond:
                queue.busy -= 1
                queue.cond.notify_all()
        if not alive:
            return


class PrefetchWorker:
    """``readers`` daemon threads draining one queue of keys with ``load_one`` (a bound method
    of the engine, which owns all locking and catches its own errors: see
    ``OffloadedExperts``). Several readers keep several reads in flight, nearest layer first:
    a disk with queue depth (NVMe, most virtual disks) delivers more that way.

    The threads hold only a weak reference to the engine: an engine (or ``Runtime``) dropped
    without ``close()`` is freed, and dropping this worker stops the threads.
    """

    def __init__(self, cond: threading.Condition,
                 load_one: Callable[[ExpertKey], None], readers: int = 1) -> None:
        self._cond = cond
        self._queue = _Queue(cond)
        method = weakref.WeakMethod(load_one)  # type: ignore[arg-type]
        self._threads = [threading.Thread(target=_run, name="offload-rt-prefetch", daemon=True,
                                          args=(self._queue, method))
                         for _ in range(max(1, readers))]
        for thread in self._threads:
            thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._queue)

    @property
    def busy(self) -> bool:
        return self._queue.busy > 0

    def submit(self, keys: Sequence[ExpertKey]) -> None:
        """Replace the queued (not started) work with ``keys``, the prediction made at the
        layer just routed for the next layers. Caller holds cond.

        Everything queued is superseded: a key for a layer already reached is stale, and one
        for a later layer was predicted at an earlier layer, from a hidden state further from
        that layer's than this prediction's, for layers this prediction covers too (it reaches
        at least as far: the same depth, one layer later, cut only at the last layer). Kept,
        a guess the newer prediction dropped would still take a read (and a slot) ahead of
        the reads the newer one wants."""
        queue = self._queue.keys
        queue.clear()
        queue.extend(dict.fromkeys(keys))  # in order, once each
        self._cond.notify_all()

    def clear(self) -> None:
        """Drop queued (not started) work. Caller holds cond."""
        self._queue.keys.clear()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the threads and wait up to ``timeout`` s in all for them; False if one is still
        running (a read that does not return; the threads are daemons and end with it)."""
        self._finalizer()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
