"""Compare eviction policies on a trace: replay, tabulate, and set each against the optimum.

``replay`` plays a ``Trace`` through one policy at one capacity exactly as the runtime's expert
cache would (see ``Trace.access_steps`` for the access order). Without predictions or modelled
prefetch it *is* ``simulate`` on the trace's steps; otherwise a replay loop with the simulator's
semantics adds two hooks per record (one layer of one forward call):

* before the record's accesses, its recorded predictions go to every pool's policy through
  ``on_predict`` (the runtime calls ``ExpertCache.predict`` in ``on_route``, before acquiring);
* with ``prefetch=True``, after them, each predicted expert not resident is inserted
  (``on_insert``, no ``on_access``), evicting if needed but never one of the record's own experts
  (the runtime protects the current layer's experts from its prefetcher). This models a
  prefetch that always lands in time; a later use of the key is a hit.

``compare`` runs several policies and capacities and reports hit rates next to ``opt``
(Belady's MIN, the best any demand-paged cache can do on the trace, computed without prefetch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from cache_policies.base import CachePolicy
from cache_policies.belady import BeladyPolicy, FutureAccesses
from cache_policies.keys import ExpertKey
from cache_policies.policy_errors import build, raised_in
from cache_policies.registry import make_policy, policy_class
from cache_policies.sim_output import format_table, notes, rows_json  # noqa: F401 - re-exported
from cache_policies.simulator import SimResult, _Evictable, _result, evict, flatten, simulate
from cache_policies.static import StaticPolicy
from cache_policies.trace import Record, Trace, TraceHeader

DEFAULT_POLICIES = ("lru", "lfu", "lrfu", "router", "opt", "static")
Pool = tuple[dict[ExpertKey, None], CachePolicy, list[int]]  # resident, policy, [hits, misses]


@dataclass(frozen=True)
class ReplayResult:
    """A simulation's counts plus what the modelled prefetcher did."""

    sim: SimResult
    prefetch_inserts: int = 0
    prefetch_useful: int = 0  # prefetched keys used before their eviction
    prefetch_wasted: int = 0  # prefetched keys evicted unused


def replay(trace: Trace, policy_factory: Callable[[], CachePolicy], capacity: int, *,
           per_layer: bool = True, predictions: bool = True,
           prefetch: bool = False) -> ReplayResult:
    """Replay ``trace`` through pools of ``capacity`` slots (per layer, or one global pool).

    Groups are split at ``capacity`` keys, as the runtime's ``max_group`` is its pool capacity,
    and a group's keys are pinned together while it is acquired. ``predictions``: feed the
    recorded predictions to policies that use them; ``prefetch``: model the prefetcher.
    """
    steps = trace.access_steps(capacity)
    num_layers = trace.header.num_layers
    hooks = prefetch or (predictions and trace.has_predictions and _uses_predictions(
        policy_factory))
    if not hooks:
        return ReplayResult(simulate(steps, policy_factory, capacity, per_layer=per_layer,
                                     num_layers=num_layers))
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    return _Replayer(policy_factory, capacity, per_layer, num_layers).run(
        trace.records, predictions, prefetch)


def _uses_predictions(policy_factory: Callable[[], CachePolicy]) -> bool:
    return type(build(policy_factory)).on_predict is not CachePolicy.on_predict


class _Replayer:
    """The simulator's loop with prediction and prefetch hooks between records."""

    def __init__(self, factory: Callable[[], CachePolicy], capacity: int, per_layer: bool,
                 num_layers: int) -> None:
        shared = None if per_layer else ({}, build(factory))
        self.pools: dict[int, Pool] = {}
        for layer in range(num_layers):
            resident, policy = shared if shared is not None else ({}, build(factory))
            self.pools[layer] = (resident, policy, [0, 0])
        self.capacity, self.per_layer, self.shared = capacity, per_layer, shared
        self.now = 0
        self.view = _Evictable()
        self.prefetched: set[ExpertKey] = set()
        self.inserts = self.useful = self.wasted = 0

    def run(self, records: Sequence[Record], predictions: bool, prefetch: bool) -> ReplayResult:
        for record in records:
            if predictions and record.predicted:
                self._predict(prediction_scores(record))
            for group in record.groups(self.capacity):
                for key in group:
                    self._access(key, group)
            if prefetch and record.predicted:
                protected = frozenset(ExpertKey(record.layer, e) for e in record.used())
                for p in record.predicted:
                    for e in p.experts:
                        self._prefetch(ExpertKey(p.layer, e), protected)
        sim = _result(self.pools, self.now, self.capacity, self.per_layer, self.shared)
        return ReplayResult(sim, self.inserts, self.useful, self.wasted)

    def _predict(self, scores: dict[ExpertKey, float]) -> None:
        """Every pool's policy hears the predictions, as in ``ExpertCache.predict``; a per-layer
        pool only those of its own layer (the only keys it can rank: 32x less work)."""
        if not self.per_layer:
            self._hook(self.shared[1], "on_predict", scores)  # type: ignore[index]
            return
        by_layer: dict[int, dict[ExpertKey, float]] = {}
        for key, prob in scores.items():
            by_layer.setdefault(key.layer, {})[key] = prob
        for layer, part in by_layer.items():
            self._hook(self.pools[layer][1], "on_predict", part)

    def _hook(self, policy: CachePolicy, hook: str, *args: object) -> None:
        """``policy.<hook>(*args, now)``; ``PolicyHookError`` naming both on a raise."""
        try:
            getattr(policy, hook)(*args, self.now)
        except Exception as exc:
            raise raised_in(policy, hook, (*args, self.now), self.now, exc) from exc

    def _access(self, key: ExpertKey, pinned: Sequence[ExpertKey]) -> None:
        resident, policy, counts = self.pools[key.layer]
        if key in resident:
            counts[0] += 1
            if key in self.prefetched:
                self.prefetched.discard(key)
                self.useful += 1
        else:
            counts[1] += 1
            if not self._make_room(resident, policy, pinned):
                raise ValueError(f"access {self.now}: no evictable slot for {key} "
                                 f"(capacity={self.capacity})")
            resident[key] = None
            self._hook(policy, "on_insert", key)
        try:  # inline, not _hook: once per access
            policy.on_access(key, self.now)
        except Exception as exc:
            raise raised_in(policy, "on_access", (key, self.now), self.now, exc) from exc
        self.now += 1

    def _prefetch(self, key: ExpertKey, protected: frozenset[ExpertKey]) -> None:
        resident, policy, _ = self.pools[key.layer]
        if key in resident or not self._make_room(resident, policy, protected):
            return  # already there, or nothing may go: the runtime's prefetcher gives up too
        resident[key] = None
        self._hook(policy, "on_insert", key)
        self.prefetched.add(key)
        self.inserts += 1

    def _make_room(self, resident: dict[ExpertKey, None], policy: CachePolicy,
                   keep: Sequence[ExpertKey] | frozenset[ExpertKey]) -> bool:
        if len(resident) < self.capacity:
            return True
        view = self.view
        view.resident, view.pinned = resident, keep  # type: ignore[assignment]
        if not view:
            return False
        victim = evict(policy, view, self.now)
        if victim in self.prefetched:
            self.prefetched.discard(victim)
            self.wasted += 1
        return True


def prediction_scores(record: Record) -> dict[ExpertKey, float]:
    """A record's predictions as ``on_predict`` scores: the recorded probabilities over all
    experts of each predicted layer, or 1.0 for each predicted expert when none were kept."""
    scores: dict[ExpertKey, float] = {}
    for p in record.predicted:
        if p.probs:
            scores.update((ExpertKey(p.layer, e), prob) for e, prob in enumerate(p.probs))
        else:
            scores.update((ExpertKey(p.layer, e), 1.0) for e in p.experts)
    return scores


# ---- comparing policies -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One policy at one capacity on one trace."""

    trace: str
    policy: str
    capacity: int  # slots per layer (the runtime's cache_experts)
    pool: str  # "layer" or "global"
    pool_slots: int  # slots of one pool: capacity, or capacity x layers for the global pool
    accesses: int
    hits: int
    misses: int
    hit_rate: float
    of_opt: float | None  # hit_rate / opt's hit_rate at the same capacity; None if opt's is 0
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

    def layer_hit_rates(self) -> dict[int, float]:
        return {layer: h / (h + self.layer_misses[layer]) if h + self.layer_misses[layer] else 0.0
                for layer, h in self.layer_hits.items()}

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        del out["layer_hits"], out["layer_misses"]
        out["per_layer"] = {str(layer): {"hits": h, "misses": self.layer_misses[layer]}
                            for layer, h in self.layer_hits.items()}
        return out


def compare(trace_or_steps: Trace | Sequence[Sequence[ExpertKey]],
            policies: Iterable[str] = DEFAULT_POLICIES, capacities: Iterable[int] = (2, 4, 6),
            per_layer: bool = True, prefetch: bool = False, *, label: str = "",
            expert_bytes: int | None = None) -> list[Row]:
    """Every policy at every capacity (slots per layer); ``opt`` is the demand-paging optimum.

    Policies are registry names or dotted paths; ``opt`` gets the flattened future and
    ``static`` the ``capacity`` most used experts of each layer in this very trace (an offline
    baseline). Given bare steps (no ``Trace``) there are no predictions, token counts or sizes.
    """
    trace = trace_or_steps if isinstance(trace_or_steps, Trace) else _steps_trace(trace_or_steps)
    names = list(policies)
    expert_bytes = expert_bytes if expert_bytes is not None else trace.header.expert_bytes
    rows = []
    for capacity in capacities:
        slots = capacity if per_layer else capacity * trace.header.num_layers
        future = FutureAccesses(flatten(trace.access_steps(slots)))
        opt = replay(trace, _factory("opt", trace, slots, capacity, future), slots,
                     per_layer=per_layer).sim
        for name in names:
            factory = _factory(name, trace, slots, capacity, future)
            result = ReplayResult(opt) if name == "opt" else replay(
                trace, factory, slots, per_layer=per_layer, prefetch=prefetch)
            fed = name != "opt" and (prefetch or _uses_predictions(factory))
            rows.append(_row(label, name, capacity, slots, per_layer, result, opt.hit_rate,
                             trace.num_tokens, expert_bytes, prefetch=prefetch and name != "opt",
                             predictions=trace.has_predictions if fed else None))
    return rows


def _factory(name: str, trace: Trace, slots: int, capacity: int,
             future: FutureAccesses) -> Callable[[], CachePolicy]:
    if name == "opt":
        return lambda: BeladyPolicy(future)
    if name == "static":
        hot = StaticPolicy.from_trace(future.keys, per_layer=capacity).hot
        return lambda: StaticPolicy(hot)
    build(policy_class(name))  # fail now: ValueError for an unknown name, else its constructor
    return lambda: make_policy(name)


def _row(label: str, name: str, capacity: int, slots: int, per_layer: bool,
         result: ReplayResult, opt_rate: float, tokens: int, expert_bytes: int | None, *,
         prefetch: bool, predictions: bool | None) -> Row:
    sim = result.sim
    moved = sim.misses + result.prefetch_inserts
    return Row(label, name, capacity, "layer" if per_layer else "global", slots, sim.accesses,
               sim.hits, sim.misses, sim.hit_rate, sim.hit_rate / opt_rate if opt_rate else None,
               tokens, moved * expert_bytes / tokens if expert_bytes and tokens else None,
               result.prefetch_inserts, result.prefetch_useful,
               dict(sim.layer_hits), dict(sim.layer_misses), prefetch, predictions)


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


# ---- output -------------------------------------------------------------------------------------
