"""A policy (user code) that raises or breaks the contract in the simulator is named as the
runtime names it: ``PolicyHookError`` with the policy class and the hook, its own exception
chained; ``offload-rt simulate`` prints one ``PolicyError`` line and exits 2."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from cache_policies import ExpertKey, LRUPolicy, simulate
from cache_policies.policy_errors import PolicyHookError
from cache_policies.sim_report import replay
from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from cache_policies.trace import write_trace
from offload_rt.cli import main

A, B, C = ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(0, 2)
STEPS = [[A], [B], [C], [A], [B]]  # capacity 1: every step after the first evicts
LABEL = f"'failing' ({__name__}.FailingPolicy)"


class FailingPolicy(LRUPolicy):
    """LRU whose ``hook`` raises ValueError("boom") on its ``nth`` call (class-wide)."""

    name: ClassVar[str] = "failing"
    hook: ClassVar[str] = ""
    nth: ClassVar[int] = 1
    calls: ClassVar[int] = 0

    def __init__(self) -> None:
        self._trip("__init__")
        super().__init__()

    def _trip(self, hook: str) -> None:
        if hook == type(self).hook:
            type(self).calls += 1
            if type(self).calls == type(self).nth:
                raise ValueError("boom")

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._trip("on_insert")
        super().on_insert(key, now)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._trip("on_access")
        super().on_access(key, now)

    def on_evict(self, key: ExpertKey) -> None:
        self._trip("on_evict")
        super().on_evict(key)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        self._trip("choose_victim")
        return super().choose_victim(candidates, now)

    def on_predict(self, scores: dict[ExpertKey, float], now: int) -> None:  # type: ignore[override]
        self._trip("on_predict")


Arm = Callable[..., type[FailingPolicy]]


@pytest.fixture()
def failing() -> Iterator[Arm]:
    """``failing(hook, nth)`` arms FailingPolicy and returns it; disarmed afterwards."""
    def arm(hook: str, nth: int = 2) -> type[FailingPolicy]:
        FailingPolicy.hook, FailingPolicy.nth, FailingPolicy.calls = hook, nth, 0
        return FailingPolicy

    yield arm
    arm("")


@pytest.mark.parametrize("hook", ["__init__", "on_insert", "on_access", "on_evict",
                                  "choose_victim"])
def test_a_raising_hook_is_named_with_its_policy(failing: Arm, hook: str) -> None:
    policy = failing(hook, nth=1)
    with pytest.raises(PolicyHookError) as info:
        simulate(STEPS, policy, 1)
    error = info.value
    assert (error.policy, error.hook) == (LABEL, hook)
    assert str(error).startswith(f"cache policy {LABEL} ")
    assert "ValueError: boom" in str(error) and isinstance(error.__cause__, ValueError)


def test_the_replay_with_predictions_names_the_hook_too(failing: Arm) -> None:
    trace = synthetic_trace(SyntheticSpec(num_layers=2, num_experts=4, top_k=2, tokens=20,
                                          predict_accuracy=0.9, seed=1))
    policy = failing("on_predict")
    with pytest.raises(PolicyHookError, match=r"raised in on_predict\(.*ValueError: boom"):
        replay(trace, policy, 2)
    for hook in ("on_insert", "choose_victim"):  # the modelled prefetcher calls them too
        policy = failing(hook, nth=5)
        with pytest.raises(PolicyHookError, match=rf"raised in {hook}\("):
            replay(trace, policy, 2, prefetch=True)


class WrongVictimPolicy(LRUPolicy):
    name: ClassVar[str] = "wrong"
    answer: ClassVar[object] = None

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        return self.answer  # type: ignore[return-value]


@pytest.mark.parametrize("answer", [ExpertKey(9, 9), None, [0, 1], B])
def test_a_victim_that_is_not_a_candidate_is_named(answer: object) -> None:
    WrongVictimPolicy.answer = answer
    steps = [[A, B], [B, C]] if answer == B else STEPS  # B: resident, but pinned by its step
    with pytest.raises(PolicyHookError) as info:
        simulate(steps, WrongVictimPolicy, 2 if answer == B else 1)
    assert info.value.hook == "choose_victim"
    assert f"cache policy 'wrong' ({__name__}.WrongVictimPolicy) chose {answer!r} in " \
           "choose_victim at access " in str(info.value)
    assert "which is not an evictable resident key" in str(info.value)


def test_simulate_command_exits_2_naming_the_policy(capsys: pytest.CaptureFixture[str],
                                                    failing: Arm, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    write_trace(trace, synthetic_trace(SyntheticSpec(num_layers=2, num_experts=4, top_k=2,
                                                     tokens=20, seed=1)))
    failing("choose_victim")
    code = main(["simulate", str(trace), "--policies", f"lru,{__name__}:FailingPolicy",
                 "--capacity", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"offload-rt: error: t.jsonl: cache policy {LABEL} raised in "
                          "choose_victim(")
    assert err.endswith(": ValueError: boom\n") and err.count("\n") == 1  # no traceback
