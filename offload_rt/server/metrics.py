"""What ``GET /metrics`` reports: requests by outcome, tokens, and the expert cache.

The runtime resets its engine counters at each generation (``Runtime.stats_dict`` describes
the last one); this adds them up since the server started, so a client sees the cache's hit
rate over everything served, and ``last_generation`` keeps the latest request's own figures.
Thread-safe: the worker thread records generations, the event loop records outcomes.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

OUTCOMES = ("ok", "invalid", "rejected", "cancelled", "failed")
# EngineStats.as_dict fields that add up across generations
SUMMED = ("hits", "misses", "host_hits", "host_misses", "bytes_moved", "bytes_from_disk",
          "bytes_host_to_device", "prefetch_issued", "prefetch_useful", "prefetch_wasted",
          "stall_s", "disk_busy_s", "h2d_busy_s", "tokens", "prompt_tokens")


class ServerMetrics:
    """Counters since start. Outcomes: ``ok`` (answered in full), ``invalid`` (4xx before
    queueing: bad JSON, a refused field, auth, unknown model, too long), ``rejected`` (429
    queue full, 503 shutting down), ``cancelled`` (the client disconnected), ``failed`` (an
    error while generating)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self._finish_reasons: Counter[str] = Counter()
        self._totals: dict[str, float] = dict.fromkeys(SUMMED, 0)
        self._generations = 0
        self._last: dict[str, Any] | None = None

    def record_outcome(self, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")
        with self._lock:
            self._outcomes[outcome] += 1

    def record_generation(self, finish_reason: str, stats: dict[str, Any]) -> None:
        """One generation's ``Runtime.stats_dict()`` and how it ended."""
        with self._lock:
            self._generations += 1
            self._finish_reasons[finish_reason] += 1
            for name in SUMMED:
                self._totals[name] += stats.get(name, 0)
            self._last = {**stats, "finish_reason": finish_reason}

    def snapshot(self) -> dict[str, Any]:
        """The JSON body of ``/metrics`` (without the queue and model parts)."""
        with self._lock:
            totals = dict(self._totals)
            looked_up = totals["hits"] + totals["misses"]
            return {
                "requests": dict(self._outcomes),
                "generations": {"count": self._generations,
                                "finish_reasons": dict(self._finish_reasons),
                                "prompt_tokens": int(totals.pop("prompt_tokens")),
                                "completion_tokens": int(totals.pop("tokens"))},
                "experts": {**{k: round(v, 6) if isinstance(v, float) else int(v)
                               for k, v in totals.items()},
                            "hit_rate": round(totals["hits"] / looked_up, 6) if looked_up
                            else 0.0},
                "last_generation": self._last,
            }
