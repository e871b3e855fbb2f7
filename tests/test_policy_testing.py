"""``cache_policies.testing.check_policy``, the contract check a researcher runs on their own
policy (issue 17, item 7): the shared contract test was not importable, and the shipped MRU
example failed its empty-candidates case with a message that did not say what was wrong."""

from __future__ import annotations

import random
import runpy
from collections.abc import Sequence
from pathlib import Path

import pytest

from cache_policies import (
    BeladyPolicy,
    CachePolicy,
    ExpertKey,
    LFUPolicy,
    LRUPolicy,
    StaticPolicy,
    available_policies,
    make_policy,
)
from cache_policies.testing import PolicyContractError, check_policy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_policy.py"


@pytest.mark.parametrize("name", available_policies())
def test_every_registered_policy_passes(name: str) -> None:
    if name == "opt":
        check_policy(BeladyPolicy, future=True)
    elif name == "static":
        check_policy(lambda: StaticPolicy([ExpertKey(0, 1), ExpertKey(1, 2)]))
    else:
        check_policy(lambda: make_policy(name))


def test_the_shipped_example_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    import cache_policies.registry

    # The example registers "mru"; keep it out of the registry other tests list.
    monkeypatch.setattr(cache_policies.registry, "_registry",
                        dict(cache_policies.registry._registry))
    namespace = runpy.run_path(str(EXAMPLE), run_name="custom_policy_example")
    check_policy(namespace["MostRecentlyUsed"])


class OldMRU(LRUPolicy):
    """The example as shipped before: ``max([])`` on no candidates."""

    name = "old-mru"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return max(candidates, key=lambda k: (self._order.get(k, 0) is None, k))


class NotACandidate(LRUPolicy):
    name = "not-a-candidate"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return ExpertKey(9, 9)


class OrderDependent(LRUPolicy):
    name = "order-dependent"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return next(iter(candidates)) if candidates else super().choose_victim(candidates, now)


class Forgetful(LRUPolicy):
    """``choose_victim`` changes state: asking twice gives another answer."""

    name = "forgetful"

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        victim = super().choose_victim(candidates, now)
        self._order.move_to_end(victim)
        return victim


class Dice(LRUPolicy):
    """Consistent within an instance, but each instance rolls its own tie-break."""

    name = "dice"
    rng = random.Random(0)

    def __init__(self) -> None:
        super().__init__()
        self.newest_first = self.rng.random() < 0.5

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        if not self.newest_first:
            return super().choose_victim(candidates, now)
        return next(k for k in reversed(self._order) if k in candidates)


class NoReset(LFUPolicy):
    """Counts survive reset(): a reset pool ranks by its past."""

    name = "no-reset"

    def reset(self) -> None:
        pass


class Raises(LRUPolicy):
    name = "raises"

    def on_evict(self, key: ExpertKey) -> None:
        raise KeyError(key)


class Nameless(LRUPolicy):
    name = ""


@pytest.mark.parametrize(("policy", "check", "needle"), [
    (OldMRU, "empty candidates", "does not say what was wrong"),
    (NotACandidate, "choose_victim", "not one of the candidates"),
    (OrderDependent, "choose_victim", "must not depend on the candidates' order"),
    (Forgetful, "choose_victim", "asked twice"),
    (Dice, "determinism", "the same calls gave other victims"),
    (NoReset, "reset", "after reset()"),
    (Raises, "hooks", "raised KeyError"),
    (Nameless, "name", "non-empty str"),
])
def test_broken_policies_are_named_with_what_broke(policy: type[CachePolicy], check: str,
                                                   needle: str) -> None:
    with pytest.raises(PolicyContractError, match=f"fails the {check} check") as info:
        check_policy(policy)
    assert needle in str(info.value)
    assert f"({policy.__module__}.{policy.__qualname__})" in str(info.value)


class Clairvoyant(CachePolicy):
    """Evicts by a future it was handed; with the pins broken (candidates ignored) it would
    beat opt: here it respects them and reads the future, so it must tie opt, not beat it."""

    name = "clairvoyant"

    def __init__(self, future: Sequence[ExpertKey]) -> None:
        self.inner = BeladyPolicy(future)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self.inner.on_insert(key, now)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self.inner.on_access(key, now)

    def on_evict(self, key: ExpertKey) -> None:
        self.inner.on_evict(key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return self.inner.choose_victim(candidates, now)

    def reset(self) -> None:
        self.inner.reset()


def test_a_future_aware_factory() -> None:
    check_policy(Clairvoyant, future=True)
