"""Errors of a policy (user code) met by the simulator, named as the runtime names them.

The runtime's expert cache turns a policy's exception into ``offload_rt.errors.PolicyError``
naming the policy class and the hook; the simulator raises ``PolicyHookError`` with the same
facts (this package never imports offload_rt), and ``offload-rt simulate`` turns it into that
``PolicyError`` (one line, exit status 2).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class PolicyHookError(RuntimeError):
    """A policy raised in a hook (its constructor included) during a simulation, or broke the
    contract (chose a victim that was not a candidate). ``policy`` is the policy's label,
    ``hook`` the method; the policy's own exception, if any, is chained (``__cause__``)."""

    def __init__(self, message: str, policy: str, hook: str) -> None:
        super().__init__(message)
        self.policy, self.hook = policy, hook


def policy_label(policy: object) -> str:
    """``'lru' (cache_policies.lru.LRUPolicy)``: the registry name and the class."""
    cls = policy if isinstance(policy, type) else type(policy)
    return f"{getattr(cls, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


def describe(exc: BaseException) -> str:
    """``Type: text`` (never empty: some exceptions have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def raised_in(policy: object, hook: str, args: Sequence[object], now: int,
              exc: Exception) -> PolicyHookError:
    """The error for ``policy.<hook>(*args)`` raising ``exc`` at access ``now``."""
    shown = ", ".join(str(a) for a in args if not isinstance(a, (list, dict)))
    label = policy_label(policy)
    return PolicyHookError(f"cache policy {label} raised in {hook}({shown}) at access {now} of "
                           f"the simulation: {describe(exc)}", label, hook)


def bad_victim(policy: object, victim: object, candidates: Sequence[object],
               now: int) -> PolicyHookError:
    """The error for a ``choose_victim`` answer that is not one of ``candidates``."""
    label = policy_label(policy)
    shown = ", ".join(map(str, list(candidates)[:8]))
    return PolicyHookError(
        f"cache policy {label} chose {victim!r} in choose_victim at access {now} of the "
        f"simulation, which is not an evictable resident key (not one of the {len(candidates)} "
        f"candidates: {shown})", label, "choose_victim")


def build(factory: Callable[[], T]) -> T:
    """``factory()``: a policy's constructor is user code too (``PolicyHookError`` naming the
    class whose ``__init__`` raised, as the runtime does)."""
    try:
        return factory()
    except Exception as exc:
        frames = [(f, f.f_locals.get("self")) for f, _ in traceback.walk_tb(exc.__traceback__)]
        owner = next((s for f, s in reversed(frames) if f.f_code.co_name == "__init__"
                      and s is not None), None)
        label = policy_label(owner) if owner is not None else "(its factory)"
        raise PolicyHookError(f"cache policy {label} could not be built: __init__ raised "
                              f"{describe(exc)}", label, "__init__") from exc
