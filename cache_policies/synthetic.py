"""Synthetic routing traces: try policies without a model, with the knobs that matter.

Each layer ranks its experts in a random order and picks them with Zipf popularity (the expert
of rank r has weight ``1 / r ** s``); with probability ``locality`` a token instead reuses the
previous token's experts at that layer, which is the temporal locality LRU feeds on (Mixtral:
consecutive tokens share a top-2 expert 45-67% of the time, about 46% by chance). ``layer_skew``
spreads the Zipf exponent across layers, from ``s * (1 - skew)`` at layer 0 to
``s * (1 + skew)`` at the last. Optional router predictions for the next layer are right with
probability ``predict_accuracy``. Seeded and pure Python: the same arguments give the same trace.
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from dataclasses import dataclass

from cache_policies.trace import Prediction, Record, Trace, TraceHeader

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # one Mixtral 8x7B expert in bfloat16
MAX_ZIPF = 10.0  # r ** (2 * MAX_ZIPF) stays finite below 10**15 experts


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of ``synthetic_trace``; the defaults are Mixtral 8x7B's shape."""

    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    tokens: int = 2000  # decode tokens, one forward call each
    prefill: int = 0  # tokens of one prefill call before them (0: none)
    zipf: float = 1.1
    locality: float = 0.5
    layer_skew: float = 0.0
    predict_accuracy: float | None = None  # None: record no predictions
    seed: int = 0
    expert_bytes: int | None = MIXTRAL_EXPERT_BYTES
    sequences: int = 1  # generations, each a prefill (if any) then ``tokens`` decode tokens

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "sequences"):
            if getattr(self, name) < 1:
                raise SyntheticSpecError(name, getattr(self, name), "must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise SyntheticSpecError("top_k", self.top_k, "must be between 1 and the number of "
                                     f"experts ({self.num_experts})")
        for name in ("tokens", "prefill"):
            if getattr(self, name) < 0:
                raise SyntheticSpecError(name, getattr(self, name), "must be >= 0")
        if self.tokens + self.prefill == 0:
            raise SyntheticSpecError("tokens", 0, "must be >= 1 without a prefill (no tokens)")
        # Finite and bounded: an exponent past MAX_ZIPF overflows r ** s (and puts every pick
        # on the top-k ranks anyway); NaN would pass a plain comparison.
        if not 0 <= self.zipf <= MAX_ZIPF:
            raise SyntheticSpecError("zipf", self.zipf, f"must be between 0 and {MAX_ZIPF}")
        for name in ("layer_skew", "locality", "predict_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise SyntheticSpecError(name, value, "must be between 0 and 1")


class SyntheticSpecError(ValueError):
    """A knob of ``SyntheticSpec`` out of range; ``field`` names it (the CLI maps it to its
    flag)."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(f"{field} {rule}, got {value}")
        self.field, self.value, self.rule = field, value, rule


def synthetic_trace(spec: SyntheticSpec | None = None, **knobs: object) -> Trace:
    """A trace drawn from ``spec`` (or ``SyntheticSpec(**knobs)``)."""
    spec = spec or SyntheticSpec(**knobs)  # type: ignore[arg-type]
    rng = random.Random(spec.seed)
    guess_rng = random.Random(f"predict:{spec.seed}")  # apart, so routing is the same either way
    weights = [_layer_weights(spec, layer, rng) for layer in range(spec.num_layers)]
    records: list[Record] = []
    sizes = ([spec.prefill] if spec.prefill else []) + [1] * spec.tokens
    for seq in range(spec.sequences):
        _sequence(spec, seq, sizes, weights, rng, guess_rng, records)
    header = TraceHeader(spec.num_layers, spec.num_experts, spec.top_k,
                         expert_bytes=spec.expert_bytes,
                         prefetch=1 if spec.predict_accuracy is not None else 0,
                         prompt_source="synthetic",
                         sequences=[{"prompt_tokens": spec.prefill, "new_tokens": spec.tokens}
                                    for _ in range(spec.sequences)],
                         metadata={"synthetic": dict(vars(spec))})
    return Trace(header, records)


def _sequence(spec: SyntheticSpec, seq: int, sizes: list[int], weights: list[list[float]],
              rng: random.Random, guess_rng: random.Random, records: list[Record]) -> None:
    """One generation's records (forward calls of ``sizes`` tokens), appended to ``records``;
    locality starts afresh, as a new prompt does."""
    previous: list[tuple[int, ...] | None] = [None] * spec.num_layers
    pos = 0
    first = len(records) // spec.num_layers
    for call, size in enumerate(sizes):
        step = first + call
        chosen = []  # per layer: [T][K]
        for layer in range(spec.num_layers):
            rows = []
            for _ in range(size):
                prev = previous[layer]
                pick = prev if prev is not None and rng.random() < spec.locality else \
                    _draw(weights[layer], spec.top_k, rng)
                previous[layer] = pick
                rows.append(pick)
            chosen.append(tuple(rows))
        for layer in range(spec.num_layers):
            predicted = _predict(spec, chosen, layer, weights, guess_rng) if size == 1 else ()
            records.append(Record(step, seq, pos, layer, chosen[layer], predicted=predicted))
        pos += size


def _layer_weights(spec: SyntheticSpec, layer: int, rng: random.Random) -> list[float]:
    """Cumulative Zipf weights of the experts, in a random rank order per layer."""
    spread = 0.0 if spec.num_layers == 1 else 2 * layer / (spec.num_layers - 1) - 1  # -1..1
    exponent = spec.zipf * (1 + spec.layer_skew * spread)
    ranks = list(range(1, spec.num_experts + 1))
    rng.shuffle(ranks)
    return list(itertools.accumulate(1.0 / r**exponent for r in ranks))


def _draw(cum: list[float], k: int, rng: random.Random) -> tuple[int, ...]:
    """k distinct experts, drawn with probability proportional to weight, without replacement.

    ``cum``: cumulative weights. A repeat is redrawn (exact: rejection gives the renormalised
    distribution); after a few repeats the remaining experts are drawn explicitly.
    """
    picked: list[int] = []
    while len(picked) < k:
        for _ in range(8):
            e = min(bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)
            if e not in picked:
                break
        else:
            rest = [e for e in range(len(cum)) if e not in picked]
            weights = [cum[e] - (cum[e - 1] if e else 0.0) for e in rest]
            e = rng.choices(rest, weights)[0]
        picked.append(e)
    return tuple(picked)


def _predict(spec: SyntheticSpec, chosen: list[tuple[tuple[int, ...], ...]], layer: int,
             weights: list[list[float]], rng: random.Random) -> tuple[Prediction, ...]:
    """The next layer's experts: the true ones with probability ``predict_accuracy``."""
    nxt = layer + 1
    if spec.predict_accuracy is None or nxt >= spec.num_layers:
        return ()
    right = rng.random() < spec.predict_accuracy
    experts = chosen[nxt][0] if right else _draw(weights[nxt], spec.top_k, rng)
    share = 0.8 / len(experts)
    rest = 0.2 / max(1, spec.num_experts - len(experts))
    probs = tuple(share if e in experts else rest for e in range(spec.num_experts))
    return (Prediction(nxt, experts, probs),)
