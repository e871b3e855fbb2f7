"""``Tier``: one memory tier's cache and slots, the loads in flight into it, and the checks
that keep a wait on it from lasting forever.

Callers hold the engine's lock around every method. A thread that reserves a slot registers
its load (``begin_load``) under the same lock hold, so a key LOADING without a registered
loader was orphaned (an interrupt between two bookkeeping steps) and nobody would ever end
the wait for it; likewise a full pool with nothing loading and no pin another thread holds
cannot free a slot. Both are reported instead of waited on.
"""

from __future__ import annotations

import logging
import threading

from cache_policies import ExpertKey
from offload_rt.engine.expert_cache import LOADING, ExpertCache
from offload_rt.engine.slots import SlotPool
from offload_rt.errors import LoaderError

log = logging.getLogger(__name__)


def _keys(keys: list[ExpertKey]) -> str:
    return ", ".join(map(str, keys[:8])) + (" ..." if len(keys) > 8 else "") or "none"


class Tier:
    """A cache, its slot storage, and the loads in flight into it (key -> loading thread)."""

    def __init__(self, cache: ExpertCache, slots: SlotPool) -> None:
        self.cache, self.slots = cache, slots
        self.inflight: dict[ExpertKey, str] = {}

    def begin_load(self, key: ExpertKey) -> None:
        """This thread fills ``key``'s reserved slot (call under the lock hold that reserved)."""
        self.inflight[key] = threading.current_thread().name

    def end_load(self, key: ExpertKey) -> None:
        self.inflight.pop(key, None)

    def load_wait(self, key: ExpertKey) -> str | None:
        """``key`` is LOADING: what a wait for it waits on (its loader), or None when no load
        runs for it; its slot is then given back and the caller can load it itself."""
        loader = self.inflight.get(key)
        if loader is not None:
            return f"expert {key}, being loaded into the {self.cache.name} tier by thread " \
                   f"{loader!r}"
        log.warning("expert %s was left loading in the %s tier by an interrupted load; "
                    "loading it again", key, self.cache.name)
        self.cache.abort(key)
        return None

    def slot_wait(self, key: ExpertKey, pins_are_transient: bool) -> str:
        """No slot of ``key``'s pool can be evicted: what a wait waits on (a load in flight,
        or, with ``pins_are_transient``, a pin another thread's transfer holds).
        ``LoaderError`` when there is neither: nothing would ever free a slot."""
        pool = self.cache.pool(key)
        loading = [k for k in pool.slots if self.cache.state[k] == LOADING]
        pinned = sorted(k for k in pool.slots if self.cache.pins[k])
        if loading or (pins_are_transient and pinned):
            return (f"a free slot in the {self.cache.name} tier for expert {key} (loading: "
                    f"{_keys(loading)}; pinned: {_keys(pinned)})")
        raise LoaderError(
            f"no slot of the {self.cache.name} tier can take expert {key}: the "
            f"{pool.capacity} slots of its pool hold {_keys(sorted(pool.slots))}, pinned "
            f"({_keys(pinned)}) or needed by this step, and no load is in flight that would free "
            "one")

    def release_leaks(self) -> None:
        """Between forward passes no expert is pinned and every LOADING key has a loader; an
        interrupt between two bookkeeping steps can break that: undo it so the run goes on."""
        if self.cache.pins:
            log.warning("releasing %s-tier pins left by an interrupted step: %s",
                        self.cache.name, dict(self.cache.pins))
            self.cache.pins.clear()
        for key in [k for k, s in self.cache.state.items() if s == LOADING]:
            if key not in self.inflight:
                self.load_wait(key)
