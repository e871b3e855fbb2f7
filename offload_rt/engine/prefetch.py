"""Router-predicted prefetch: guess later layers' experts and load them in the background.

At layer l of a decode step, layer l+j's gate is applied (after l+j's own norm) to the residual
stream entering layer l's MoE; its top-k experts are queued for a background thread that loads
them into free or evictable slots while layer l computes. The worker never evicts what the
current layer needs (pinned or protected keys), never waits for a slot (best effort), and hands
any failure back to the caller through the engine.
"""

from __future__ import annotations

import threading
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


class PrefetchWorker:
    """One daemon thread draining a queue of keys with ``load_one`` (which owns all locking)."""

    def __init__(self, cond: threading.Condition,
                 load_one: Callable[[ExpertKey], None]) -> None:
        self._cond, self._load_one = cond, load_one
        self._queue: deque[ExpertKey] = deque()
        self._stop = False
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="offload-rt-prefetch", daemon=True)
        self._thread.start()

    def submit(self, keys: Sequence[ExpertKey], current_layer: int) -> None:
        """Replace queued work: keys for layers already reached are stale. Caller holds cond."""
        stale = [k for k in self._queue if k.layer <= current_layer]
        for k in stale:
            self._queue.remove(k)
        self._queue.extend(k for k in keys if k not in self._queue)
        self._cond.notify_all()

    def clear(self) -> None:
        """Drop queued (not started) work. Caller holds cond."""
        self._queue.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                key = self._queue.popleft()
                self.busy = True
            try:
                self._load_one(key)
            finally:
                with self._cond:
                    self.busy = False
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=10)
