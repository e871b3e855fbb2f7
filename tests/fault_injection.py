"""Fault injection for the tests/test_faults_*.py files: policies that raise in a chosen hook on
a chosen thread, readers that raise (``KeyboardInterrupt`` included) or hang, a guard that turns
a hang into a test failure, and the check that a failure left the cache clean.

The policies are importable by dotted path (``--policy fault_injection:RaisingPolicy``): this
folder is on ``sys.path`` (conftest.py), so the CLI resolves them to this very module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cache_policies import ExpertKey, LRUPolicy
from offload_rt.engine.expert_cache import LOADING
from offload_rt.engine.offloaded import OffloadedExperts, Reader

PREFETCH_THREAD = "offload-rt-prefetch"  # PrefetchWorker's thread name
HANG_S = 30.0  # every run here takes well under a second: anything near this is a hang


def on_prefetch_thread() -> bool:
    return threading.current_thread().name == PREFETCH_THREAD


# ---- policies ------------------------------------------------------------------------------

@dataclass
class Arming:
    """Which call raises: the ``nth`` call of ``hook`` on the prefetch thread or elsewhere."""

    hook: str = ""
    prefetch: bool = False
    nth: int = 1
    error: Callable[[], BaseException] = lambda: RuntimeError("injected policy failure")
    calls: int = 0
    fired: bool = False


ARMED = Arming()  # RaisingPolicy reads this; ``arm`` replaces it


def arm(hook: str, *, prefetch: bool = False, nth: int = 1,
        error: Callable[[], BaseException] | None = None) -> Arming:
    """Make the ``nth`` ``hook`` call of any RaisingPolicy on that thread raise once."""
    global ARMED
    ARMED = Arming(hook, prefetch, nth) if error is None else \
        Arming(hook, prefetch, nth, error)
    return ARMED


def disarm() -> None:
    arm("")


class RaisingPolicy(LRUPolicy):
    """LRU, except that the armed call raises before LRU sees it (so LRU's own state stays
    as if the call never came)."""

    name: ClassVar[str] = "raising-lru"

    def _maybe_raise(self, hook: str) -> None:
        armed = ARMED
        if armed.hook != hook or armed.fired or on_prefetch_thread() != armed.prefetch:
            return
        armed.calls += 1
        if armed.calls == armed.nth:
            armed.fired = True
            raise armed.error()

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._maybe_raise("on_insert")
        super().on_insert(key, now)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._maybe_raise("on_access")
        super().on_access(key, now)

    def on_evict(self, key: ExpertKey) -> None:
        self._maybe_raise("on_evict")
        super().on_evict(key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        self._maybe_raise("choose_victim")
        return super().choose_victim(candidates, now)

    def on_predict(self, scores: Any, now: int) -> None:
        self._maybe_raise("on_predict")
        super().on_predict(scores, now)


class ChooseRaiser(LRUPolicy):
    """Raises in every ``choose_victim``, on any thread (for the command line)."""

    name: ClassVar[str] = "choose-raiser"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        raise ValueError("no victim today")


class PrefetchInsertRaiser(LRUPolicy):
    """Raises in ``on_insert`` on the prefetch thread only (for the command line)."""

    name: ClassVar[str] = "prefetch-insert-raiser"

    def on_insert(self, key: ExpertKey, now: int) -> None:
        if on_prefetch_thread():
            raise KeyError(key)
        super().on_insert(key, now)


class InitRaiser(LRUPolicy):
    """Cannot even be built."""

    name: ClassVar[str] = "init-raiser"

    def __init__(self) -> None:
        raise RuntimeError("no state today")


class OutsiderPolicy(LRUPolicy):
    """Chooses a victim that is not among the candidates."""

    name: ClassVar[str] = "outsider"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return ExpertKey(999, 999)


# ---- readers -------------------------------------------------------------------------------

class FaultyReader:
    """Delegates to ``inner``; the ``nth`` read on the chosen side (the prefetch thread, or
    demand loads) raises ``error()`` instead, or first blocks until ``release`` is set."""

    def __init__(self, inner: Reader, *, in_prefetch: bool, nth: int = 1,
                 error: Callable[[], BaseException] = lambda: OSError("injected read failure"),
                 block: bool = False) -> None:
        self.inner, self.in_prefetch, self.nth, self.error = inner, in_prefetch, nth, error
        self.block, self.release, self.blocked = block, threading.Event(), threading.Event()
        self.calls = 0
        self.failed_key: ExpertKey | None = None
        self._lock = threading.Lock()

    def __call__(self, key: ExpertKey, out: torch.Tensor) -> None:
        if on_prefetch_thread() == self.in_prefetch:
            with self._lock:
                self.calls += 1
                fire = self.calls == self.nth
            if fire:
                self.failed_key = key
                if self.block:
                    self.blocked.set()
                    self.release.wait(HANG_S)
                else:
                    raise self.error()
        self.inner(key, out)


# ---- guards --------------------------------------------------------------------------------

@dataclass
class Outcome:
    result: Any = None
    error: BaseException | None = None


def run_guarded(fn: Callable[[], Any], limit_s: float = HANG_S) -> Outcome:
    """Run ``fn`` in a thread; fail the test if it has not returned or raised in ``limit_s``."""
    outcome = Outcome()

    def target() -> None:
        try:
            outcome.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.error = exc

    thread = threading.Thread(target=target, name="test-generation", daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s: a hang"
    return outcome


def assert_clean(experts: OffloadedExperts) -> None:
    """After a failure: no pin, no half-loaded slot, no load registered, every slot counted."""
    experts.drain()
    for tier in (experts.device, experts.host):
        if tier is None:
            continue
        cache = tier.cache
        assert dict(cache.pins) == {}, f"pins left after the failure: {dict(cache.pins)}"
        assert [k for k, s in cache.state.items() if s == LOADING] == []
        assert getattr(tier, "inflight", {}) == {}
        for pool in cache.pools:
            assert len(pool.slots) + len(pool.free) == pool.capacity
            assert set(pool.slots) <= set(cache.state)
