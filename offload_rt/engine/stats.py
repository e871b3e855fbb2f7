"""Statistics of the expert engine: part of the product, reported after every generation."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class BusyClock:
    """Seconds during which at least one transfer on a link (the disk, host -> device) was in
    flight: overlapping transfers count once. Callers serialize ``enter``/``leave``."""

    def __init__(self) -> None:
        self.inflight = 0
        self._since = 0.0

    def enter(self) -> None:
        if self.inflight == 0:
            self._since = time.perf_counter()
        self.inflight += 1

    def leave(self) -> float:
        """End one transfer; the busy seconds this closes (0 while others are in flight)."""
        self.inflight -= 1
        return time.perf_counter() - self._since if self.inflight == 0 else 0.0


@dataclass
class EngineStats:
    """Counters since the last ``reset``. 'hits'/'misses' are the device tier's; a miss the
    CPU computed from host RAM (``host_computed``) is a miss that moved no bytes to the
    device."""

    hits: int = 0
    misses: int = 0
    host_hits: int = 0
    host_misses: int = 0
    layer_hits: Counter = field(default_factory=Counter)
    layer_misses: Counter = field(default_factory=Counter)
    bytes_from_disk: int = 0
    bytes_host_to_device: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted: int = 0
    stall_s: float = 0.0
    disk_busy_s: float = 0.0  # at least one disk read in flight (BusyClock)
    h2d_busy_s: float = 0.0  # at least one host -> device copy in flight
    tokens: int = 0
    # device-tier misses the CPU computed from host RAM instead (hybrid), and their tokens
    host_computed: int = 0
    host_computed_tokens: int = 0
    # Prefetched keys not used or evicted yet. Kept here so ``reset`` forgets them too: each
    # prefetch is counted useful or wasted at most once, in the period that issued it.
    pending_prefetch: set = field(default_factory=set, repr=False)

    def reset(self) -> None:
        fresh = EngineStats()
        self.__dict__.update(fresh.__dict__)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_from_disk + self.bytes_host_to_device

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the CLI's ``stats`` object)."""
        layers = sorted(set(self.layer_hits) | set(self.layer_misses))
        return {
            "hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 6),
            "host_hits": self.host_hits, "host_misses": self.host_misses,
            "bytes_moved": self.bytes_moved, "bytes_from_disk": self.bytes_from_disk,
            "bytes_host_to_device": self.bytes_host_to_device,
            "bytes_per_token": self.bytes_moved / self.tokens if self.tokens else 0.0,
            "prefetch_issued": self.prefetch_issued, "prefetch_useful": self.prefetch_useful,
            "prefetch_wasted": self.prefetch_wasted, "stall_s": round(self.stall_s, 6),
            "disk_busy_s": round(self.disk_busy_s, 6), "h2d_busy_s": round(self.h2d_busy_s, 6),
            "host_computed": self.host_computed,
            "host_computed_tokens": self.host_computed_tokens,
            "per_layer": {str(i): {"hits": self.layer_hits[i], "misses": self.layer_misses[i]}
                          for i in layers},
        }
