"""``OffloadedExperts``: the ExpertProvider that streams experts through the tiers.

    disk (safetensors) -> [host slots, pinned; CUDA only] -> device slots -> expert compute

Demand loads run in the caller's thread (a stall, timed); predicted loads run on the prefetch
threads. With ``hybrid`` (``engine.hybrid``), a device-tier miss that few tokens need is not
moved to the device at all: it is pinned in the host tier and the CPU computes it. One
condition variable guards every cache's bookkeeping; bytes move outside it.

Faults (README "What happens when things go wrong"): every transition is undone on every
exception path (a reserved slot is given back, a pin released); a failure on the prefetch
thread is kept and raised in the caller at its next request, and the thread keeps working;
a ``KeyboardInterrupt`` is never wrapped; a wait that nothing can end raises at once, and one
whose load does not return raises after ``WAIT_TIMEOUT_S``, naming what it waited for.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from cache_policies import ExpertKey
from offload_rt.engine.expert_cache import LOADING, RESIDENT, describe
from offload_rt.engine.hybrid import HybridRule
from offload_rt.engine.mover import WAIT_S, WAIT_TIMEOUT_S, ExpertMover, Reader
from offload_rt.engine.placement import Placement
from offload_rt.engine.prefetch import PREFETCH_READERS, NextLayerPredictor, PrefetchWorker
from offload_rt.engine.prefetch_depth import AdaptiveDepth
from offload_rt.engine.stats import EngineStats
from offload_rt.engine.tier import Tier
from offload_rt.engine.transfer import HostToDevice
from offload_rt.errors import LoaderError, PolicyError
from offload_rt.model.experts import ExpertBuffers

log = logging.getLogger(__name__)


def _count_evicted(stats: EngineStats, key: ExpertKey) -> None:
    """A prefetched key left the cache unused: wasted. (A function of the stats alone, so the
    cache holds no reference back to the engine.)"""
    if key in stats.pending_prefetch:
        stats.pending_prefetch.discard(key)
        stats.prefetch_wasted += 1


class OffloadedExperts(ExpertMover):
    """Expert weights cached on the device tier, fed from an optional host tier and the disk."""

    def __init__(self, device: Tier, reader: Reader, expert_nbytes: int, *,
                 placement: Placement, host: Tier | None = None,
                 h2d: HostToDevice | None = None, predictor: NextLayerPredictor | None = None,
                 prefetch_depth: int = 0, per_layer: bool = True,
                 hybrid: HybridRule | None = None, adaptive: AdaptiveDepth | None = None) -> None:
        super().__init__(device, reader, expert_nbytes, placement, host, h2d)
        self.predictor, self.depth, self.per_layer = predictor, prefetch_depth, per_layer
        if hybrid is not None and host is None:
            raise ValueError("hybrid miss handling needs a host tier to compute from")
        self.hybrid = hybrid if hybrid is not None and hybrid.max_tokens > 0 else None
        self._routed: dict[int, int] = {}  # expert -> tokens routed to it, this layer (hybrid)
        self._error: BaseException | None = None
        self._hidden: torch.Tensor | None = None
        self._protected: frozenset[ExpertKey] = frozenset()
        # prefetched keys whose layer has not run yet in this step: evicted last (reserve)
        self._ahead: set[ExpertKey] = set()
        # (keys, scores) the latest on_route predicted, or None: what the prefetch acted on
        self.last_predictions: tuple[list[ExpertKey], dict[ExpertKey, float]] | None = None
        device.cache._on_evict = functools.partial(_count_evicted, self.stats)
        self._worker = PrefetchWorker(self._cond, self._prefetch_one, PREFETCH_READERS) \
            if predictor is not None and prefetch_depth > 0 else None
        # the depth in use adapts up to prefetch_depth (None: always prefetch_depth)
        self.adaptive = adaptive if self._worker is not None else None

    # ---- ExpertProvider -------------------------------------------------------------------
    def max_group(self, layer: int) -> int:
        return self.device.cache.pool(ExpertKey(layer, 0)).capacity

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        with self._cond:
            self._raise_pending()
            if layer == 0:
                self.device.release_leaks()
                self.stats.tokens += hidden.shape[0]
        if layer == 0 and self.adaptive is not None:
            self.adaptive.forget_step()
        self._hidden = hidden

    def on_route(self, layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        used, counts = torch.unique(ids, return_counts=True)
        needed = frozenset(ExpertKey(layer, e) for e in used.tolist())
        if self.hybrid is not None:  # each token picks an expert once: counts are tokens
            self._routed = dict(zip(used.tolist(), counts.tolist(), strict=True))
        self.last_predictions = None
        with self._cond:
            self._protected = needed
            # every layer routes once per forward, so a key of a layer reached is no longer
            # ahead (and at the last layer, none is)
            self._ahead = {k for k in self._ahead if k.layer > layer}
            worker, hidden = self._worker, self._hidden  # close() may clear them meanwhile
            if worker is None or hidden is None or self.predictor is None:
                return
        if hidden.shape[0] > 1:  # a prefill chunk: the next layers' experts, in demand order
            prefill = self.predictor.predict_prefill(layer, hidden, self.depth_now,
                                                     self.max_group)
            with self._cond:
                worker.submit(prefill)
            return
        keys, scores = self.predictor.predict(layer, hidden, self.depth)
        if self.adaptive is not None:  # every distance checked, the current depth's queued
            self._adapt(layer, used.tolist(), keys)
            keys = self.adaptive.within(layer, keys)
            depth = self.adaptive.depth
            scores = {k: p for k, p in scores.items() if k.layer - layer <= depth}
        self.last_predictions = (keys, scores)  # read by the trace recorder (no second predict)
        with self._cond:
            self.device.cache.predict(scores)
            if self.host is not None:
                self.host.cache.predict(scores)
            worker.submit(keys)

    @property
    def depth_now(self) -> int:
        """Layers ahead the prefetch reads now (``depth``, or less while adapting)."""
        return self.adaptive.depth if self.adaptive is not None else self.depth

    def _adapt(self, layer: int, used: list[int], keys: list[ExpertKey]) -> None:
        """Check the predictions made for ``layer`` against ``used``, record ``keys`` (made
        at ``layer``), and say when the depth changes."""
        assert self.adaptive is not None
        before = self.adaptive.depth
        self.adaptive.routed(layer, used)
        self.adaptive.predicted(layer, keys)
        after = self.adaptive.depth
        if after != before:
            edge = after if after > before else after + 1  # the distance that decided
            log.info("prefetch depth %d -> %d (experts predicted %d layers ahead used: %.2f, "
                     "threshold %.2f)", before, after, edge,
                     self.adaptive.precision(edge) or 0.0, self.adaptive.threshold)

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Mapping[int, torch.Tensor]]:
        keys = [ExpertKey(layer, e) for e in experts]
        slots: dict[int, int] = {}
        host_slots: dict[int, int] = {}  # hybrid: experts the CPU computes from host RAM
        try:
            with self._cond:
                self._raise_pending()
                for key in keys:
                    if self._runs_on_host(key, len(host_slots)):
                        host_slots[key.expert] = self._pin_for_host(key, keys)
                    else:
                        slots[key.expert] = self._acquire_one(key, keys)
            for slot in slots.values():
                self.h2d.ready(slot)
            buffers = {e: self.device.slots[s] for e, s in slots.items()}
            if host_slots:
                assert self.host is not None
                buffers |= {e: self.host.slots[s] for e, s in host_slots.items()}
                buffers = ExpertBuffers(buffers, frozenset(host_slots))
            yield buffers
        finally:
            with self._cond:
                for e, slot in slots.items():
                    self.device.cache.unpin(ExpertKey(layer, e))
                    self.h2d.released(slot)
                for e in host_slots:
                    self.host.cache.unpin(ExpertKey(layer, e))  # type: ignore[union-attr]
                self._cond.notify_all()

    # ---- hybrid: a miss computed where it sits (lock held on entry and exit) ---------------
    def _runs_on_host(self, key: ExpertKey, pinned_here: int) -> bool:
        """Whether the CPU computes ``key`` this step: a device-tier miss (not resident, not
        on its way) whose token count the rule sends to the host, while this step leaves one
        host slot it does not pin (the copies of the step's other misses pass through one)."""
        if self.hybrid is None or self.host is None or key in self.device.cache.state:
            return False
        return (self.hybrid.on_host(self._routed.get(key.expert, 0))
                and pinned_here < self.host.cache.num_slots - 1)

    def _pin_for_host(self, key: ExpertKey, group: Sequence[ExpertKey]) -> int:
        """Pin ``key`` in the host tier (read from disk on a host miss, with the lock
        released meanwhile, a stall) for the CPU to compute; returns its host slot."""
        self.device.cache.tick()
        self._count(key, hit=False)
        self.stats.host_computed += 1
        self.stats.host_computed_tokens += self._routed.get(key.expert, 0)
        start, stalled = time.perf_counter(), self.stats.stall_s
        self._cond.release()
        try:
            return self._host_acquire(key, group, demand=True)
        finally:
            self._cond.acquire()
            # its waits counted themselves; the whole time is the stall
            self.stats.stall_s = stalled + time.perf_counter() - start

    # ---- demand path (caller's thread, lock held on entry and exit) ------------------------
    def _acquire_one(self, key: ExpertKey, group: Sequence[ExpertKey]) -> int:
        """Pin ``key`` in the device tier, loading it on a miss; returns its slot. On any
        exception nothing stays pinned or reserved for it."""
        cache = self.device.cache
        cache.tick()
        counted, since = False, time.perf_counter()
        while True:
            state = cache.state.get(key)
            if state == RESIDENT:
                if not counted:
                    self._count(key, hit=True)
                cache.touch(key)  # before the pin: a policy error leaves nothing to undo
                cache.pin(key)
                if key in self.stats.pending_prefetch:
                    self.stats.pending_prefetch.discard(key)
                    self.stats.prefetch_useful += 1
                return cache.slot(key)  # type: ignore[return-value]
            if state == LOADING:  # a prefetch is bringing it: a hit, possibly late
                if not counted:
                    self._count(key, hit=True)
                    counted = True
                self._await_load(self.device, key, since, demand=True)
                continue
            # The group's other keys are needed now: evicting one only reloads it. They
            # fit (max_group), so a slot frees up once in-flight loads land.
            slot = cache.reserve(key, group, self._ahead)
            if slot is None:  # every free slot is pinned or still loading: wait for one
                self._await_slot(self.device, key, since, demand=True)
                continue
            if not counted:
                self._count(key, hit=False)
            cache.pin(key)
            try:
                self._load_unlocked(key, slot, demand=True, group=group)
                cache.touch(key)
            except BaseException:
                cache.unpin(key)
                raise
            return slot

    def _count(self, key: ExpertKey, hit: bool) -> None:
        if hit:
            self.stats.hits += 1
            self.stats.layer_hits[key.layer] += 1
        else:
            self.stats.misses += 1
            self.stats.layer_misses[key.layer] += 1

    def _load_unlocked(self, key: ExpertKey, slot: int, demand: bool,
                       group: Iterable[ExpertKey]) -> None:
        """Fill device ``slot`` with ``key`` (lock held on entry/exit, released meanwhile).
        On failure the slot is given back; ``Exception``s come back as ``LoaderError`` naming
        the expert (a ``PolicyError`` as itself), anything else (``KeyboardInterrupt``) as is."""
        start = time.perf_counter()
        self.device.begin_load(key)
        failure: BaseException | None = None
        self._cond.release()
        try:
            self._fill(key, slot, group, demand)
        except BaseException as exc:  # noqa: BLE001 - undone and re-raised below
            failure = exc
        finally:
            self._cond.acquire()
        self.device.end_load(key)
        self._cond.notify_all()
        if failure is None:
            if demand:
                self.stats.stall_s += time.perf_counter() - start
            self.device.cache.commit(key)
            return
        self.device.cache.abort(key)
        if isinstance(failure, Exception) and not isinstance(failure, PolicyError):
            raise LoaderError(f"loading expert {key} failed: {describe(failure)}") from failure
        raise failure

    # ---- prefetch path (worker thread) ------------------------------------------------------
    def _prefetch_one(self, key: ExpertKey) -> None:
        """Load ``key`` if there is room; any failure (a read, the policy) is kept for the
        caller (``_raise_pending``) and the worker goes on with the next key."""
        with self._cond:
            try:
                self._prefetch_locked(key)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.stats.pending_prefetch.discard(key)
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()

    def _prefetch_locked(self, key: ExpertKey) -> None:
        cache = self.device.cache
        if key in cache.state or self._error is not None:
            return
        if key.layer <= max((k.layer for k in self._protected), default=-1):
            return  # queued before its layer was reached: the demand path has it now
        slot = cache.reserve(key, self._protected, self._ahead)
        if slot is None:
            return
        self._ahead.add(key)
        self.stats.prefetch_issued += 1
        self.stats.pending_prefetch.add(key)
        self._load_unlocked(key, slot, demand=False, group=self._protected)

    def _raise_pending(self) -> None:
        """Raise, in the caller, what failed on the prefetch thread since the last request."""
        if self._error is None:
            return
        exc, self._error = self._error, None
        if isinstance(exc, PolicyError):
            raise PolicyError(f"{exc} (on the prefetch thread)") from exc
        if isinstance(exc, LoaderError):
            raise LoaderError(f"background expert load failed: {exc}") from exc.__cause__
        # anything else, a SystemExit or KeyboardInterrupt raised by a reader on the prefetch
        # thread included: a failed load there, not a request to stop the caller
        raise LoaderError(f"background expert load failed: {describe(exc)}") from exc

    # ---- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait until no prefetch is queued or running (tests, clean shutdown)."""
        with self._cond:
            if self._worker is not None:
                self._worker.clear()
                since = time.perf_counter()
                while self._worker.busy:
                    if time.perf_counter() - since > WAIT_TIMEOUT_S:
                        raise LoaderError(f"the prefetch thread has been loading for "
                                          f"{WAIT_TIMEOUT_S:.0f} s: a hung read?")
                    self._cond.wait(WAIT_S)

    def forget_request(self) -> None:
        """After a request ended with an error (reported to its caller): wait for the prefetch
        made for it and drop a failure the prefetch thread met meanwhile, so the next request
        does not end with the last one's (a failure that persists, such as a lost disk, meets
        the next request's own reads)."""
        try:
            self.drain()
        except LoaderError as exc:  # a hung read: the next request's waits report it
            log.warning("%s", exc)
        with self._cond:
            if self._error is not None:
                log.info("dropped a prefetch failure of the request that failed: %s",
                         describe(self._error))
                self._error = None

    def close(self) -> None:
        """Stop the prefetch thread (waits for a read in flight, up to 10 s)."""
        worker, self._worker = self._worker, None
        if worker is not None and not worker.close():
            log.warning("the prefetch thread did not stop within 10 s (a read in flight); "
                        "it ends when the read returns")
