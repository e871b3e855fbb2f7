"""Router-predicted prefetch: guess later layers' experts and load them in the background.

At layer l of a decode step, layer l+j's gate is applied (after l+j's own norm) to the residual
stream entering layer l's MoE; its top-k experts are queued for a background thread that loads
them into free or evictable slots while layer l computes. The worker never evicts what the
current layer needs (pinned or protected keys), never waits for a slot (best effort), and hands
any failure back to the caller through the engine. The thread holds no strong reference to the
engine (``weakref``): dropping the engine ends it.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence

import torch

from cache_policies import ExpertKey
from offload_rt.model.norm import RMSNorm
from offload_rt.model.router import Router


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


class _Queue:
    """What the thread shares with its worker: keys, flags and the engine's condition, and
    nothing that leads back to the engine, so a dropped engine is freed and its thread ends."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.keys: deque[ExpertKey] = deque()
        self.stop = False
        self.busy = False


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
            queue.busy = True
        try:
            alive = _load(load_one, key)
        finally:
            with queue.cond:
                queue.busy = False
                queue.cond.notify_all()
        if not alive:
            return


class PrefetchWorker:
    """One daemon thread draining a queue of keys with ``load_one`` (a bound method of the
    engine, which owns all locking and catches its own errors: see ``OffloadedExperts``).

    The thread holds only a weak reference to the engine: an engine (or ``Runtime``) dropped
    without ``close()`` is freed, and dropping this worker stops the thread.
    """

    def __init__(self, cond: threading.Condition,
                 load_one: Callable[[ExpertKey], None]) -> None:
        self._cond = cond
        self._queue = _Queue(cond)
        self._thread = threading.Thread(target=_run, name="offload-rt-prefetch", daemon=True,
                                        args=(self._queue, weakref.WeakMethod(load_one)))  # type: ignore[arg-type]
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._queue)

    @property
    def busy(self) -> bool:
        return self._queue.busy

    def submit(self, keys: Sequence[ExpertKey], current_layer: int) -> None:
        """Replace queued work: keys for layers already reached are stale. Caller holds cond."""
        queue = self._queue.keys
        stale = [k for k in queue if k.layer <= current_layer]
        for k in stale:
            queue.remove(k)
        queue.extend(k for k in keys if k not in queue)
        self._cond.notify_all()

    def clear(self) -> None:
        """Drop queued (not started) work. Caller holds cond."""
        self._queue.keys.clear()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread and wait up to ``timeout`` s for it; False if it is still running
        (a read that does not return; the thread is a daemon and ends with it)."""
        self._finalizer()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)
        return not self._thread.is_alive()
