"""One policy at one pool size on one trace: the numbers ``compare`` reports, and their JSON.

Pool sizes are counted in slots, each holding one expert. A per-layer layout has one pool per
layer of ``capacity`` slots (the runtime's ``--cache-experts``); a global layout one pool of
``pool_slots`` slots shared by every layer (``--pool global``: what a memory budget buys, e.g.
22 slots for Mixtral 8x7B in 12 GiB). ``slots`` is the total either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cache_policies.segments import DECODE, PREFILL, SegmentCounts


@dataclass(frozen=True)
class PoolSize:
    """A pool layout and size: ``capacity`` slots per layer, or ``pool_slots`` in one pool."""

    per_layer: bool
    pool_slots: int  # slots of one pool
    capacity: int | None = None  # slots per layer, when the size was given per layer

    @classmethod
    def per_layer_slots(cls, capacity: int, num_layers: int, per_layer: bool) -> PoolSize:
        """``capacity`` slots per layer: in a pool per layer, or a global pool of that many
        times the layers (``--capacity K --pool global``)."""
        return cls(per_layer, capacity if per_layer else capacity * num_layers, capacity)

    @classmethod
    def global_slots(cls, slots: int) -> PoolSize:
        """One global pool of ``slots`` slots in all (``--slots``)."""
        return cls(False, slots, None)

    def total(self, num_layers: int) -> int:
        return self.pool_slots * num_layers if self.per_layer else self.pool_slots

    def label(self) -> str:
        """``4 per layer``, ``24 total``, or ``24 total (4/layer)`` for a global pool sized per
        layer (``--capacity 4 --pool global``): how the table writes the size."""
        if self.per_layer:
            return f"{self.pool_slots} per layer"
        per_layer = f" ({self.capacity}/layer)" if self.capacity is not None else ""
        return f"{self.pool_slots} total{per_layer}"


@dataclass(frozen=True)
class Row:
    """One policy at one pool size on one trace. Rates are hits / accesses."""

    trace: str  # the trace's label (its file name, or more of its path when names repeat)
    policy: str
    capacity: int | None  # slots per layer (None: a global pool sized in total slots)
    pool: str  # "layer" or "global"
    pool_slots: int  # slots of one pool
    accesses: int
    hits: int
    misses: int
    hit_rate: float
    of_opt: float | None  # hit_rate / the reference's (see ``reference``); None if that is 0
    tokens: int
    bytes_per_token: float | None  # (misses + prefetch inserts) x expert bytes / tokens
    prefetch_inserts: int = 0
    prefetch_useful: int = 0
    layer_hits: dict[int, int] = field(default_factory=dict)
    layer_misses: dict[int, int] = field(default_factory=dict)
    prefetch: bool = False  # modelled prefetch (never for opt)
    # Whether the replay had the trace's predictions to use: None = no use for them (the policy
    # ignores on_predict and prefetch was not modelled), else whether the trace holds any.
    predictions: bool | None = None
    slots: int = 0  # slots of all pools together
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    segments: tuple[SegmentCounts, ...] = ()  # per sequence and phase, in trace order
    reference: str = "opt"  # what of_opt divides by: "opt", or "opt+prefetch" for prefetch rows
    above_opt: bool = False  # hit rate above opt's, the demand-paging optimum (prefetch only)
    # 95% bootstrap intervals over sequences: "hit_rate", "decode_hit_rate", "of_opt".
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    trace_path: str = ""  # the file the trace was read from ("" if none)
    method: str = "simulated"  # or "one-pass" (a stack-distance curve, equal to simulating)

    def layer_hit_rates(self) -> dict[int, float]:
        return {layer: h / (h + self.layer_misses[layer]) if h + self.layer_misses[layer] else 0.0
                for layer, h in self.layer_hits.items()}

    def size(self) -> PoolSize:
        return PoolSize(self.pool == "layer", self.pool_slots, self.capacity)

    def phase(self, phase: str) -> dict[str, float | int | None] | None:
        """Hits, misses, tokens, hit rate and misses per token of ``phase`` (PREFILL/DECODE),
        or None when the trace has none of it."""
        part = [s for s in self.segments if s.phase == phase]
        if not part:
            return None
        hits, misses = sum(s.hits for s in part), sum(s.misses for s in part)
        tokens = sum(s.tokens for s in part)
        return {"hits": hits, "misses": misses, "tokens": tokens,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "misses_per_token": misses / tokens if tokens else None}

    def sequences(self) -> list[dict[str, object]]:
        """Per sequence (generate call): hits, misses, tokens, hit rate, and each phase's."""
        out: dict[int, dict[str, object]] = {}
        for s in self.segments:
            entry = out.setdefault(s.seq, {"seq": s.seq, "hits": 0, "misses": 0, "tokens": 0})
            entry["hits"] += s.hits  # type: ignore[operator]
            entry["misses"] += s.misses  # type: ignore[operator]
            entry["tokens"] += s.tokens  # type: ignore[operator]
            entry[s.phase] = {"hits": s.hits, "misses": s.misses, "tokens": s.tokens}
        for entry in out.values():
            n = entry["hits"] + entry["misses"]  # type: ignore[operator]
            entry["hit_rate"] = entry["hits"] / n if n else None  # type: ignore[operator]
        return list(out.values())

    def as_dict(self) -> dict[str, object]:
        """The JSON form: every field, per-layer counts under ``per_layer``, the phases and
        sequences (``phase``, ``sequences``), intervals as ``[low, high]``."""
        out = asdict(self)
        del out["layer_hits"], out["layer_misses"], out["segments"]
        out["per_layer"] = {str(layer): {"hits": h, "misses": self.layer_misses[layer]}
                            for layer, h in self.layer_hits.items()}
        out[PREFILL], out[DECODE] = self.phase(PREFILL), self.phase(DECODE)
        out["sequences"] = self.sequences()
        out["ci"] = {name: list(bounds) for name, bounds in self.ci.items()}
        return out
