"""``ExpertMover``: moving one expert's bytes between the tiers, and the engine's bounded waits.

    disk -> device slot (CPU: the device tier is RAM), or disk -> pinned host slot -> device slot

The base of ``OffloadedExperts``, which decides what to load and when. Bytes move with no lock
held; bookkeeping happens under the engine's condition ``_cond``. Every wait here either ends
(a load in flight lands, another thread's transfer lets go of a pin) or raises a
``LoaderError`` naming what it waited for: at once when nothing could end it (``Tier``), after
``WAIT_TIMEOUT_S`` when a read does not return.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from cache_policies import ExpertKey
from offload_rt.engine.expert_cache import LOADING, RESIDENT
from offload_rt.engine.placement import Placement
from offload_rt.engine.stats import BusyClock, EngineStats
from offload_rt.engine.tier import Tier
from offload_rt.engine.transfer import HostToDevice
from offload_rt.errors import LoaderError

Reader = Callable[[ExpertKey, torch.Tensor], None]  # fills a packed buffer from disk
WAIT_S = 0.05  # waits are sliced so a background failure surfaces quickly
WAIT_TIMEOUT_S = 300.0  # a load in flight this long is a hung read: give up with a diagnosis


class ExpertMover:
    """Disk reads, host-tier staging and host -> device copies of single experts."""

    def __init__(self, device: Tier, reader: Reader, expert_nbytes: int, placement: Placement,
                 host: Tier | None, h2d: HostToDevice | None) -> None:
        self.device, self.host, self.reader = device, host, reader
        self.placement = placement  # where each expert sits in its slots (bit-exactness)
        self.h2d = h2d or HostToDevice()
        self.expert_nbytes = expert_nbytes
        self.stats = EngineStats()
        self._disk_clock, self._h2d_clock = BusyClock(), BusyClock()
        self._cond = threading.Condition()

    def _raise_pending(self) -> None:
        """Raise what failed in the background (the engine's; called by waits)."""

    def _fill(self, key: ExpertKey, slot: int, group: Iterable[ExpertKey], demand: bool) -> None:
        """Move bytes (no lock held): disk -> device, or disk -> host -> device. ``demand``:
        the caller waits for it (its waits are stalls, and surface background failures)."""
        dst = self.device.slots.place(slot, self.placement.compute_phase(key))
        if self.host is None:  # the device tier is RAM the disk fills (compute = read phase)
            self._read(key, dst)
            with self._cond:
                self.stats.bytes_from_disk += self._disk_nbytes(key)
            return
        hslot = self._host_acquire(key, group, demand)
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

    def _host_acquire(self, key: ExpertKey, group: Iterable[ExpertKey], demand: bool) -> int:
        """Pin ``key`` in the host tier, reading it from disk on a host miss. The victim is
        preferably not in ``group`` (what the current layer still needs: evicting it only
        reads it again); when every unpinned host slot holds such a key, one of them goes."""
        assert self.host is not None
        host, cache = self.host, self.host.cache
        with self._cond:
            cache.tick()
            since = time.perf_counter()
            while True:
                state = cache.state.get(key)
                if state == RESIDENT:
                    self.stats.host_hits += 1
                    cache.touch(key)
                    cache.pin(key)
                    return cache.slot(key)  # type: ignore[return-value]
                if state == LOADING:
                    self._await_load(host, key, since, demand)
                    continue
                hslot = cache.reserve(key, group)
                if hslot is None:
                    hslot = cache.reserve(key)
                if hslot is None:
                    self._await_slot(host, key, since, demand)
                    continue
                self.stats.host_misses += 1
                cache.pin(key)
                host.begin_load(key)
                break
        try:
            self._read(key, host.slots.place(hslot, self.placement.read_phase(key)))
            with self._cond:
                host.end_load(key)
                cache.commit(key)
                self.stats.bytes_from_disk += self._disk_nbytes(key)
                cache.touch(key)  # a policy error here: resident, and unpinned below
        except BaseException:
            with self._cond:
                host.end_load(key)
                cache.unpin(key)
                self._cond.notify_all()
                if cache.state.get(key) == LOADING:
                    cache.abort(key)
            raise
        return hslot

    # ---- waits (lock held): each ends, or raises naming what it waited for ----------------
    def _await_load(self, tier: Tier, key: ExpertKey, since: float, demand: bool) -> None:
        what = tier.load_wait(key)
        if what is not None:  # else: its orphaned slot was given back; the caller retries
            self._wait(since, what, demand)

    def _await_slot(self, tier: Tier, key: ExpertKey, since: float, demand: bool) -> None:
        # host pins are held only by transfers in progress; device pins by this step
        self._wait(since, tier.slot_wait(key, pins_are_transient=tier is self.host), demand)

    def _wait(self, since: float, what: str, demand: bool) -> None:
        """One slice of a wait that began at ``since``; a demand wait counts as a stall and
        raises what failed in the background meanwhile."""
        start = time.perf_counter()
        if start - since > WAIT_TIMEOUT_S:
            raise LoaderError(f"waited {start - since:.0f} s for {what}: the read has not "
                              "returned (a hung disk or network file system?)")
        self._cond.wait(WAIT_S)
        if demand:
            self.stats.stall_s += time.perf_counter() - start
            self._raise_pending()

