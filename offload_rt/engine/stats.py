"""Statistics of the expert engine: part of the product, reported after every generation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineStats:
    """Counters since the last ``reset``. 'hits'/'misses' are the device tier's."""

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
    tokens: int = 0
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
            "per_layer": {str(i): {"hits": self.layer_hits[i], "misses": self.layer_misses[i]}
                          for i in layers},
        }
