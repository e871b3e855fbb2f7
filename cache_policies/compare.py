"""Compare eviction policies on a trace at several pool sizes, next to the optimum.

``compare`` replays every policy at every pool size (``PoolSize``: slots per layer, or a global
pool's total) and sets each hit rate against ``opt`` (Belady's MIN, the best any demand-paged
cache can do on the trace). LRU and ``opt`` come from one pass over the trace per pool layout
(``miss_curve``: exact, the same counts as simulating) wherever the size holds the largest step;
the other policies, and LRU with modelled prefetch, are simulated. With ``prefetch`` the rows
are set against ``opt+prefetch`` (``prefetch_reference``) instead, and rows above ``opt`` are
flagged. Each row counts hits per sequence and phase; with more than one sequence it carries
95% bootstrap intervals (``bootstrap``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cache_policies.base import CachePolicy
from cache_policies.belady import BeladyPolicy, FutureAccesses
from cache_policies.bootstrap import DEFAULT_RESAMPLES, Bootstrap
from cache_policies.keys import ExpertKey
from cache_policies.miss_curve import ONE_PASS, MissCurve, miss_curve
from cache_policies.policy_errors import build
from cache_policies.prefetch_reference import NAME as REFERENCE
from cache_policies.prefetch_reference import prefetch_reference
from cache_policies.registry import make_policy, policy_class
from cache_policies.replay import ReplayResult, _uses_predictions, replay
from cache_policies.rows import PoolSize, Row
from cache_policies.segments import DECODE, Segment, segment_steps, trace_segments, with_counts
from cache_policies.simulator import flatten
from cache_policies.static import StaticPolicy
from cache_policies.trace import Record, Trace, TraceHeader

DEFAULT_POLICIES = ("lru", "lfu", "lrfu", "router", "opt", "static")


def compare(trace_or_steps: Trace | Sequence[Sequence[ExpertKey]],
            policies: Iterable[str] = DEFAULT_POLICIES, capacities: Iterable[int] = (2, 4, 6),
            per_layer: bool = True, prefetch: bool = False, *, slots: Iterable[int] = (),
            label: str = "", path: str = "", expert_bytes: int | None = None,
            resamples: int = DEFAULT_RESAMPLES, one_pass: bool = True) -> list[Row]:
    """Rows for every policy at every size: ``capacities`` are slots per layer (a pool per
    layer, or with ``per_layer=False`` a global pool of that many times the layers), ``slots``
    the total slots of one global pool. ``opt`` gets the flattened future; ``static`` pins the
    pool's worth of this very trace's most used experts (an offline baseline). ``prefetch``:
    model it, and add an ``opt+prefetch`` row per size when the trace has predictions.
    ``resamples``: bootstrap draws for the intervals (0: none); ``one_pass=False``: simulate
    LRU and opt too (same counts). Given bare steps (no ``Trace``) there are no predictions,
    token counts or sizes. ``ValueError`` for an unknown policy or a size that cannot hold a
    step.
    """
    trace = trace_or_steps if isinstance(trace_or_steps, Trace) else _steps_trace(trace_or_steps)
    layers = trace.header.num_layers
    sizes = [PoolSize.per_layer_slots(c, layers, per_layer) for c in capacities]
    sizes += [PoolSize.global_slots(s) for s in slots]
    names = list(policies)
    for name in names:
        if name not in ("opt", "static"):
            build(policy_class(name))  # fail now: unknown name, or its constructor raises
    run = _Comparison(trace, sizes, label, path, expert_bytes, resamples, one_pass)
    return [row for size in sizes for row in run.rows(size, names, prefetch)]


@dataclass
class _Comparison:
    trace: Trace
    sizes: list[PoolSize]
    label: str
    path: str
    expert_bytes: int | None
    resamples: int
    one_pass: bool

    def __post_init__(self) -> None:
        self.segments: list[Segment] = trace_segments(self.trace)
        self.seqs = sorted({s.seq for s in self.segments})
        many = len(self.seqs) > 1 and self.resamples > 0
        self.boot = Bootstrap(len(self.seqs), self.resamples) if many else None
        self.curves: dict[tuple[bool, str], MissCurve] = {}
        self.tokens = self.trace.num_tokens
        self._future: FutureAccesses | None = None
        if self.expert_bytes is None:
            self.expert_bytes = self.trace.header.expert_bytes

    def future(self) -> FutureAccesses:
        """The flattened accesses, for ``opt`` and ``static``: built once, on first need (the
        same at every size: splitting a record's experts into groups keeps their order)."""
        if self._future is None:
            self._future = FutureAccesses(flatten(self.trace.access_steps()))
        return self._future

    def rows(self, size: PoolSize, names: list[str], prefetch: bool) -> list[Row]:
        opt, opt_method = self._replay("opt", size, lambda: BeladyPolicy(self.future()), False)
        reference = self._reference(size) if prefetch and self.trace.has_predictions else None
        out = []
        for name in names:
            if name == "opt":
                out.append(self._row(name, size, opt, opt, opt, opt_method))
                continue
            factory = self._factory(name, size)
            result, method = self._replay(name, size, factory, prefetch)
            fed = prefetch or _uses_predictions(factory)
            out.append(self._row(name, size, result, opt, reference or opt, method,
                                 prefetch=prefetch,
                                 predictions=self.trace.has_predictions if fed else None))
        if reference is not None:
            out.append(self._row(REFERENCE, size, reference, opt, reference, "simulated",
                                 prefetch=True, predictions=True))
        return out

    def _replay(self, name: str, size: PoolSize, factory: Callable[[], CachePolicy],
                prefetch: bool) -> tuple[ReplayResult, str]:
        """``name``'s result at ``size``: from its one-pass curve where that is exact, else
        simulated."""
        if self.one_pass and name in ONE_PASS and not prefetch:
            curve = self._curve(size.per_layer, name)
            if curve.exact(size.pool_slots):
                return ReplayResult(curve.result(size.pool_slots)), "one-pass"
        return replay(self.trace, factory, size.pool_slots, per_layer=size.per_layer,
                      prefetch=prefetch, segments=self.segments), "simulated"

    def _curve(self, per_layer: bool, name: str) -> MissCurve:
        key = (per_layer, name)
        if key not in self.curves:
            largest = max(s.pool_slots for s in self.sizes if s.per_layer == per_layer)
            self.curves[key] = miss_curve(
                self.trace.access_steps(), name, per_layer=per_layer,
                segments=segment_steps(self.trace, self.segments, None),
                num_layers=self.trace.header.num_layers, max_size=largest)
        return self.curves[key]

    def _reference(self, size: PoolSize) -> ReplayResult:
        return prefetch_reference(self.trace, size.pool_slots, per_layer=size.per_layer,
                                  segments=self.segments)

    def _factory(self, name: str, size: PoolSize) -> Callable[[], CachePolicy]:
        if name == "static":
            keys = self.future().keys
            if size.capacity is not None:
                hot = StaticPolicy.from_trace(keys, per_layer=size.capacity).hot
            else:
                hot = StaticPolicy.from_trace(keys, total=size.pool_slots).hot
            return lambda: StaticPolicy(hot)
        return lambda: make_policy(name)

    def _row(self, name: str, size: PoolSize, result: ReplayResult, opt: ReplayResult,
             base: ReplayResult, method: str, *, prefetch: bool = False,
             predictions: bool | None = None) -> Row:
        """``base``: what ``of_opt`` divides by (opt, or opt+prefetch for prefetch rows)."""
        sim = result.sim
        moved = sim.misses + result.prefetch_inserts
        tokens, nbytes = self.tokens, self.expert_bytes
        return Row(
            trace=self.label, policy=name, capacity=size.capacity,
            pool="layer" if size.per_layer else "global", pool_slots=size.pool_slots,
            accesses=sim.accesses, hits=sim.hits, misses=sim.misses, hit_rate=sim.hit_rate,
            of_opt=sim.hit_rate / base.sim.hit_rate if base.sim.hit_rate else None,
            tokens=tokens, bytes_per_token=moved * nbytes / tokens if nbytes and tokens else None,
            prefetch_inserts=result.prefetch_inserts, prefetch_useful=result.prefetch_useful,
            layer_hits=dict(sim.layer_hits), layer_misses=dict(sim.layer_misses),
            prefetch=prefetch, predictions=predictions,
            slots=size.total(self.trace.header.num_layers),
            prefetch_wasted=result.prefetch_wasted,
            segments=with_counts(self.segments, sim.segment_hits, sim.segment_misses),
            reference="opt" if base is opt else REFERENCE,
            above_opt=prefetch and sim.hit_rate > opt.sim.hit_rate,
            ci=self._intervals(result, base), trace_path=self.path, method=method)

    def _intervals(self, result: ReplayResult, base: ReplayResult) -> dict[str, tuple[float,
                                                                                      float]]:
        if self.boot is None or not result.sim.segment_hits:
            return {}
        hits, accesses = self._per_seq(result, None)
        d_hits, d_accesses = self._per_seq(result, DECODE)
        ref_hits, _ = self._per_seq(base, None)
        out = {"hit_rate": self.boot.ratio_ci(hits, accesses),
               "decode_hit_rate": self.boot.ratio_ci(d_hits, d_accesses),
               "of_opt": self.boot.ratio_ci(hits, ref_hits)}
        return {k: v for k, v in out.items() if v is not None}

    def _per_seq(self, result: ReplayResult, phase: str | None) -> tuple[list[int], list[int]]:
        index = {seq: i for i, seq in enumerate(self.seqs)}
        hits, accesses = [0] * len(self.seqs), [0] * len(self.seqs)
        sim = result.sim
        for seg, h, m in zip(self.segments, sim.segment_hits, sim.segment_misses):
            if phase is None or seg.phase == phase:
                hits[index[seg.seq]] += h
                accesses[index[seg.seq]] += h + m
        return hits, accesses


def _steps_trace(steps: Sequence[Sequence[ExpertKey]]) -> Trace:
    """Bare simulator steps as a trace: one single-token record per step, kept as given."""
    keys = [k for step in steps for k in step]
    layers = 1 + max((k.layer for k in keys), default=0)
    experts = 1 + max((k.expert for k in keys), default=0)
    records = [_StepRecord(step=i, seq=0, pos=i, layer=s[0].layer if s else 0,
                           experts=(tuple(k.expert for k in s),), keys=tuple(s))
               for i, s in enumerate(steps)]
    return Trace(TraceHeader(layers, experts, max(map(len, steps), default=1)), list(records))


@dataclass(frozen=True)
class _StepRecord(Record):
    """A record that replays one given simulator step verbatim (any layers, any order)."""

    keys: tuple[ExpertKey, ...] = ()

    @property
    def num_tokens(self) -> int:
        return 0

    def groups(self, max_group: int | None = None) -> list[list[ExpertKey]]:
        return [list(self.keys)]
