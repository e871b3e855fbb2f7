"""``OffloadedExperts``: the ExpertProvider that streams experts through the tiers.

    disk (safetensors) -> [host slots, pinned; CUDA only] -> device slots -> expert compute

Demand loads run in the caller's thread (a stall, timed); predicted loads run on the prefetch
thread. One condition variable guards every cache's bookkeeping; bytes move outside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from cache_policies import ExpertKey
from offload_rt.engine.expert_cache import LOADING, RESIDENT, ExpertCache
from offload_rt.engine.placement import Placement
from offload_rt.engine.prefetch import NextLayerPredictor, PrefetchWorker
from offload_rt.engine.slots import SlotPool
from offload_rt.engine.stats import BusyClock, EngineStats
from offload_rt.engine.transfer import HostToDevice
from offload_rt.errors import LoaderError

Reader = Callable[[ExpertKey, torch.Tensor], None]  # fills a packed buffer from disk
WAIT_S = 0.05  # waits are sliced so a background failure surfaces quickly


class Tier:
    """A cache and its slot storage."""

    def __init__(self, cache: ExpertCache, slots: SlotPool) -> None:
        self.cache, self.slots = cache, slots


class OffloadedExperts:
    """Expert weights cached on the device tier, fed from an optional host tier and the disk."""

    def __init__(self, device: Tier, reader: Reader, expert_nbytes: int, *,
                 placement: Placement, host: Tier | None = None,
                 h2d: HostToDevice | None = None, predictor: NextLayerPredictor | None = None,
                 prefetch_depth: int = 0, per_layer: bool = True) -> None:
        self.device, self.host, self.reader = device, host, reader
        self.placement = placement  # where each expert sits in its slots (bit-exactness)
        self.h2d = h2d or HostToDevice()
        self.expert_nbytes = expert_nbytes
        self.predictor, self.depth, self.per_layer = predictor, prefetch_depth, per_layer
        self.stats = EngineStats()
        self._disk_clock, self._h2d_clock = BusyClock(), BusyClock()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._hidden: torch.Tensor | None = None
        self._protected: frozenset[ExpertKey] = frozenset()
        # (keys, scores) the latest on_route predicted, or None: what the prefetch acted on
        self.last_predictions: tuple[list[ExpertKey], dict[ExpertKey, float]] | None = None
        device.cache._on_evict = self._evicted
        self._worker = PrefetchWorker(self._cond, self._prefetch_one) \
            if predictor is not None and prefetch_depth > 0 else None

    # ---- ExpertProvider -------------------------------------------------------------------
    def max_group(self, layer: int) -> int:
        return self.device.cache.pools[0].capacity

    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        with self._cond:
            self._raise_pending()
            if layer == 0:
                self.stats.tokens += hidden.shape[0]
        # Prefill routes many tokens at once: only single-token decode steps predict ahead.
        self._hidden = hidden if hidden.shape[0] == 1 else None

    def on_route(self, layer: int, probs: torch.Tensor, ids: torch.Tensor) -> None:
        needed = frozenset(ExpertKey(layer, e) for e in torch.unique(ids).tolist())
        self.last_predictions = None
        with self._cond:
            self._protected = needed
            worker, hidden = self._worker, self._hidden  # close() may clear them meanwhile
            if worker is None or hidden is None or self.predictor is None:
                return
        keys, scores = self.predictor.predict(layer, hidden, self.depth)
        self.last_predictions = (keys, scores)  # read by the trace recorder (no second predict)
        with self._cond:
            self.device.cache.predict(scores)
            if self.host is not None:
                self.host.cache.predict(scores)
            worker.submit(keys, layer)

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Mapping[int, torch.Tensor]]:
        keys = [ExpertKey(layer, e) for e in experts]
        slots: dict[int, int] = {}
        try:
            with self._cond:
                self._raise_pending()
                for key in keys:
                    slots[key.expert] = self._acquire_one(key, keys)
            for slot in slots.values():
                self.h2d.ready(slot)
            yield {e: self.device.slots[s] for e, s in slots.items()}
        finally:
            with self._cond:
                for e, slot in slots.items():
                    self.device.cache.unpin(ExpertKey(layer, e))
                    self.h2d.released(slot)
                self._cond.notify_all()

    # ---- demand path (caller's thread, lock held on entry and exit) ------------------------
    def _acquire_one(self, key: ExpertKey, group: Sequence[ExpertKey]) -> int:
        cache = self.device.cache
        cache.tick()
        counted = False
        while True:
            state = cache.state.get(key)
            if state == RESIDENT:
                if not counted:
                    self._count(key, hit=True)
                cache.touch(key)
                cache.pin(key)
                if key in self.stats.pending_prefetch:
                    self.stats.pending_prefetch.discard(key)
                    self.stats.prefetch_useful += 1
                return cache.slot(key)  # type: ignore[return-value]
            if state == LOADING:  # a prefetch is bringing it: a hit, possibly late
                if not counted:
                    self._count(key, hit=True)
                    counted = True
                self._wait()
                continue
            # The group's other keys are needed now: evicting one only reloads it. They
            # fit (max_group), so a slot frees up once in-flight loads land.
            slot = cache.reserve(key, group)
            if slot is None:  # every free slot is pinned or still loading: wait for one
                self._wait()
                continue
            if not counted:
                self._count(key, hit=False)
            cache.pin(key)
            self._load_unlocked(key, slot, demand=True, group=group)
            cache.touch(key)
            return slot

    def _count(self, key: ExpertKey, hit: bool) -> None:
        if hit:
            self.stats.hits += 1
            self.stats.layer_hits[key.layer] += 1
        else:
            self.stats.misses += 1
            self.stats.layer_misses[key.layer] += 1

    def _wait(self) -> None:
        start = time.perf_counter()
        self._cond.wait(WAIT_S)
        self.stats.stall_s += time.perf_counter() - start
        self._raise_pending()

    def _load_unlocked(self, key: ExpertKey, slot: int, demand: bool,
                       group: Iterable[ExpertKey]) -> None:
        """Fill device ``slot`` with ``key`` (lock held on entry/exit, released meanwhile)."""
        start = time.perf_counter()
        self._cond.release()
        try:
            self._fill(key, slot, group)
        except BaseException as exc:
            self._cond.acquire()
            self.device.cache.abort(key)
            if demand:
                self.device.cache.unpin(key)
                self._cond.notify_all()
                raise LoaderError(f"loading expert {key} failed: {exc}") from exc
            raise
        self._cond.acquire()
        if demand:
            self.stats.stall_s += time.perf_counter() - start
        self.device.cache.commit(key)
        self._cond.notify_all()

    def _fill(self, key: ExpertKey, slot: int, group: Iterable[ExpertKey]) -> None:
        """Move bytes (no lock held): disk -> device, or disk -> host -> device."""
        dst = self.device.slots.place(slot, self.placement.compute_phase(key))
        if self.host is None:  # the device tier is RAM the disk fills (compute = read phase)
            self._read(key, dst)
            with self._cond:
                self.stats.bytes_from_disk += self._disk_nbytes(key)
            return
        hslot = self._host_acquire(key, group)
        try:
            with self._busy(self._h2d_clock, "h2d_busy_s"):
                self.h2d.copy(dst, self.host.slots[hslot], slot)
        finally:
            with self._cond:
                self.host.cache.unpin(key)
                self.stats.bytes_host_to_device += self.expert_nbytes
                self._cond.notify_all()

    def _read(self, key: ExpertKey, out: torch.Tensor) -> None:
        """The reader, with the disk's busy time accounted (no lock held on entry)."""
        with self._busy(self._disk_clock, "disk_busy_s"):
            self.reader(key, out)

    @contextmanager
    def _busy(self, clock: BusyClock, stat: str) -> Iterator[None]:
        """A transfer on ``clock``'s link; its busy seconds go to ``stats.<stat>``."""
        with self._cond:
            clock.enter()
        try:
            yield
        finally:
            with self._cond:
                setattr(self.stats, stat, getattr(self.stats, stat) + clock.leave())

    def _disk_nbytes(self, key: ExpertKey) -> int:
        """Bytes a read of ``key`` takes from disk (file dtype; the slot may hold another)."""
        nbytes = getattr(self.reader, "nbytes", None)
        return nbytes(key) if nbytes is not None else self.expert_nbytes

    def _host_acquire(self, key: ExpertKey, group: Iterable[ExpertKey]) -> int:
        """Pin ``key`` in the host tier, reading it from disk on a host miss. The victim is
        preferably not in ``group`` (what the current layer still needs: evicting it only
        reads it again); when every unpinned host slot holds such a key, one of them goes."""
        assert self.host is not None
        cache = self.host.cache
        with self._cond:
            cache.tick()
            while True:
                state = cache.state.get(key)
                if state == RESIDENT:
                    self.stats.host_hits += 1
                    cache.touch(key)
                    cache.pin(key)
                    return cache.slot(key)  # type: ignore[return-value]
                if state == LOADING:
                    self._cond.wait(WAIT_S)
                    continue
                hslot = cache.reserve(key, group)
                if hslot is None:
                    hslot = cache.reserve(key)
                if hslot is None:
                    self._cond.wait(WAIT_S)
                    continue
                self.stats.host_misses += 1
                cache.pin(key)
                break
        try:
            self._read(key, self.host.slots.place(hslot, self.placement.read_phase(key)))
        except BaseException:
            with self._cond:
                cache.unpin(key)
                cache.abort(key)
            raise
        with self._cond:
            cache.commit(key)
            cache.touch(key)
            self.stats.bytes_from_disk += self._disk_nbytes(key)
        return hslot

    # ---- prefetch path (worker thread) ------------------------------------------------------
    def _prefetch_one(self, key: ExpertKey) -> None:
        with self._cond:
            cache = self.device.cache
            if key in cache.state or self._error is not None:
                return
            slot = cache.reserve(key, self._protected)
            if slot is None:
                return
            self.stats.prefetch_issued += 1
            self.stats.pending_prefetch.add(key)
            try:
                self._load_unlocked(key, slot, demand=False, group=self._protected)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.stats.pending_prefetch.discard(key)
                self._error = exc
                self._cond.notify_all()

    def _evicted(self, key: ExpertKey) -> None:
        if key in self.stats.pending_prefetch:
            self.stats.pending_prefetch.discard(key)
            self.stats.prefetch_wasted += 1

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise LoaderError(f"background expert load failed: {exc}") from exc

    # ---- lifecycle --------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait until no prefetch is queued or running (tests, clean shutdown)."""
        with self._cond:
            if self._worker is not None:
                self._worker.clear()
                while self._worker.busy:
                    self._cond.wait(WAIT_S)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
