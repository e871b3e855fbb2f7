"""``StepClock``: per-forward time and engine counters, so decode steps can be told apart from
the prefill (``offload-rt bench`` and the benchmarks use it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from offload_rt.engine.stats import EngineStats

COUNTERS = ("hits", "misses", "bytes_from_disk", "bytes_host_to_device", "stall_s",
            "prefetch_issued", "prefetch_useful", "prefetch_wasted", "disk_busy_s",
            "h2d_busy_s", "host_computed")


class StepClock:
    """Hooks on a model's forward: ``steps`` gets one dict per forward call with the seconds
    (``t``), the deltas of ``COUNTERS`` (and of ``extra()``'s figures) and ``T``, the tokens
    the call processed (1 = a decode step)."""

    def __init__(self, stats: EngineStats, extra: Callable[[], dict[str, float]] | None = None
                 ) -> None:
        self.stats, self.extra = stats, extra
        self.steps: list[dict[str, float]] = []
        self._start: dict[str, float] = {}

    def _snap(self) -> dict[str, float]:
        snap = {k: float(getattr(self.stats, k)) for k in COUNTERS}
        if self.extra is not None:
            snap.update(self.extra())
        snap["t"] = time.perf_counter()
        return snap

    def pre(self, module: Any, args: tuple[Any, ...]) -> None:
        self._start = self._snap()

    def post(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        end = self._snap()
        self.steps.append({k: end[k] - self._start[k] for k in end} | {"T": args[0].shape[0]})

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[StepClock]:
        handles = [model.register_forward_pre_hook(self.pre),
                   model.register_forward_hook(self.post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def decode_totals(self) -> dict[str, float]:
        """Sums over the decode steps (one token each); empty if there were none."""
        decode = [s for s in self.steps if s["T"] == 1]
        if not decode:
            return {}
        totals = {k: sum(s[k] for s in decode) for k in decode[0]}
        totals["steps"] = len(decode)
        return totals
