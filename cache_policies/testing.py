"""Check a policy against the contract of ``cache_policies.base``, before trusting its numbers.

    from cache_policies.testing import check_policy
    check_policy(MyPolicy)                    # raises PolicyContractError saying what broke

No test framework needed (pytest's ``assert`` is not used: the checks run anywhere). Seeded
random operation sequences (demand accesses, prefetches, drops, predictions, random pins) run
through a reference cache that owns capacity and pins and only asks the policy to rank, as
``tests/test_policy_contract.py`` does for the built-in policies. Checked:

* ``name`` is a non-empty string;
* ``choose_victim`` returns one of the candidates, the same one whatever their order, without
  changing the policy (asking twice gives the same answer) or the candidates;
* the same calls give the same victims (no randomness, hashing order or clock), and after
  ``reset()`` the policy behaves as a new one;
* a single candidate is returned; no candidates raise ``ValueError`` whose message mentions
  "candidate" (``base.require_candidates`` does this);
* it runs in the simulator, whose candidates are a read-only live view, deterministically, and
  never beats ``opt`` (Belady's MIN).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from cache_policies.base import CachePolicy
from cache_policies.belady import BeladyPolicy, FutureAccesses
from cache_policies.keys import ExpertKey
from cache_policies.policy_errors import policy_label
from cache_policies.simulator import flatten, simulate
from cache_policies.synthetic import synthetic_trace

UNIVERSE = tuple(ExpertKey(layer, expert) for layer in range(2) for expert in range(4))
KINDS = ("access", "access", "access", "prefetch", "drop", "predict")
Factory = Callable[..., CachePolicy]  # () -> policy, or (future) -> policy when future=True
Call = tuple[str, ExpertKey, frozenset[ExpertKey], dict[ExpertKey, float]]


class PolicyContractError(AssertionError):
    """The policy broke the contract; the message names the check, the case and what to fix."""


def check_policy(policy: Factory, *, future: bool = False, examples: int = 200,
                 seed: int = 0) -> None:
    """Run every check above on ``policy`` (a class or a factory) or raise
    ``PolicyContractError``. ``future=True``: the factory takes the sequence of demand
    accesses (``BeladyPolicy``); otherwise it takes no arguments. ``examples``: random
    operation sequences, of up to 60 calls each."""
    make = policy if future else (lambda _future: policy())
    label = policy_label(policy if isinstance(policy, type) else make(()))
    name = getattr(make(()), "name", None)
    if not isinstance(name, str) or not name:
        _fail(label, "name", f"class attribute `name` must be a non-empty str, got {name!r}")
    rng = random.Random(seed)
    for example in range(examples):
        calls = _calls(rng, rng.randrange(61))
        capacity = rng.randint(1, 6)
        first = _run(make, calls, capacity, label, example)
        if _run(make, calls, capacity, label, example) != first:
            _fail(label, "determinism", f"example {example} (seed {seed}): the same calls gave "
                  "other victims; no randomness, set/hash iteration order or clock")
        _check_reset(make, calls, capacity, label, example, first)
    _check_small_cases(make, label)
    _check_in_simulator(make, label)


def _fail(label: str, check: str, message: str) -> None:
    raise PolicyContractError(f"cache policy {label} fails the {check} check: {message}")


def _calls(rng: random.Random, count: int) -> list[Call]:
    out = []
    for _ in range(count):
        key = rng.choice(UNIVERSE)
        pins = frozenset(k for k in UNIVERSE if k != key and rng.random() < 0.3)
        scores = {ExpertKey(key.layer, e): rng.random() for e in range(4)}
        out.append((rng.choice(KINDS), key, pins, scores))
    return out


@dataclass
class _RefCache:
    """The smallest cache that follows the calling protocol, checking the policy's answers."""

    policy: CachePolicy
    capacity: int
    label: str
    resident: list[ExpertKey] = field(default_factory=list)
    victims: list[ExpertKey] = field(default_factory=list)
    now: int = 0

    def make_room(self, pinned: frozenset[ExpertKey]) -> bool:
        if len(self.resident) < self.capacity:
            return True
        candidates = sorted(k for k in self.resident if k not in pinned)
        if not candidates:
            return False
        shown = tuple(candidates)
        victim = self.policy.choose_victim(candidates, self.now)
        if tuple(candidates) != shown:
            _fail(self.label, "choose_victim", f"it changed its candidates list {list(shown)}")
        if victim not in shown:
            _fail(self.label, "choose_victim", f"it returned {victim!r}, not one of the "
                  f"candidates {list(shown)} (pinned or absent keys must stay)")
        again = self.policy.choose_victim(list(reversed(shown)), self.now)
        if again != victim:
            _fail(self.label, "choose_victim", f"asked twice (candidates reversed) it chose "
                  f"{victim} then {again}: the answer must not depend on the candidates' order "
                  "or change the policy (only on_evict may)")
        self.resident.remove(victim)
        self.policy.on_evict(victim)
        self.victims.append(victim)
        return True

    def apply(self, kind: str, key: ExpertKey, pins: frozenset[ExpertKey],
              scores: dict[ExpertKey, float]) -> None:
        pinned = frozenset(sorted(pins)[:max(0, self.capacity - 1)]) | {key}
        if kind == "access":
            if key in self.resident:
                self.policy.on_access(key, self.now)
            else:
                self.make_room(pinned)
                self.resident.append(key)
                self.policy.on_insert(key, self.now)
                self.policy.on_access(key, self.now)
            self.now += 1
        elif kind == "prefetch" and key not in self.resident and self.make_room(pinned):
            self.resident.append(key)
            self.policy.on_insert(key, self.now)
        elif kind == "drop" and key in self.resident:
            self.resident.remove(key)
            self.policy.on_evict(key)
        elif kind == "predict":
            self.policy.on_predict(scores, self.now)


def _run(make: Factory, calls: list[Call], capacity: int, label: str, example: int,
         policy: CachePolicy | None = None) -> list[ExpertKey]:
    accesses = [key for kind, key, _, _ in calls if kind == "access"]
    cache = _RefCache(policy if policy is not None else make(accesses), capacity, label)
    for call in calls:
        try:
            cache.apply(*call)
        except PolicyContractError:
            raise
        except Exception as exc:  # noqa: BLE001 - the policy is user code: any error is a finding
            _fail(label, "hooks", f"example {example}: {call[0]} of {call[1]} raised "
                  f"{type(exc).__name__}: {exc}")
    return cache.victims


def _check_reset(make: Factory, calls: list[Call], capacity: int, label: str, example: int,
                 first: list[ExpertKey]) -> None:
    accesses = [key for kind, key, _, _ in calls if kind == "access"]
    used = make(accesses)
    _run(make, calls, capacity, label, example, used)
    used.reset()
    if _run(make, calls, capacity, label, example, used) != first:
        _fail(label, "reset", f"example {example}: after reset() it chose other victims than "
              "a new instance; reset() must forget everything")


def _check_small_cases(make: Factory, label: str) -> None:
    a, b = ExpertKey(0, 0), ExpertKey(0, 1)
    policy = make([a, b])
    for now, key in enumerate((a, b)):
        policy.on_insert(key, now)
        policy.on_access(key, now)
    for only in (a, b):
        if policy.choose_victim([only], 2) != only:
            _fail(label, "single candidate", f"choose_victim([{only}]) must return {only}")
    try:
        chosen = policy.choose_victim([], 2)
    except ValueError as exc:
        if "candidate" not in str(exc):
            _fail(label, "empty candidates", f"choose_victim([]) raised ValueError({str(exc)!r}),"
                  " whose message does not say what was wrong; call cache_policies.base."
                  "require_candidates(candidates) first")
        return
    except Exception as exc:  # noqa: BLE001 - the policy is user code: any error is a finding
        _fail(label, "empty candidates", f"choose_victim([]) raised {type(exc).__name__}: "
              f"{exc}; raise ValueError (cache_policies.base.require_candidates)")
    _fail(label, "empty candidates", f"choose_victim([]) returned {chosen!r}; raise ValueError "
          "(cache_policies.base.require_candidates)")


def _check_in_simulator(make: Factory, label: str) -> None:
    trace = synthetic_trace(num_layers=2, num_experts=6, top_k=2, tokens=150, prefill=8, seed=3)
    for per_layer, capacity in ((True, 3), (False, 5)):
        steps = trace.access_steps(capacity)  # the prefill in groups the pool can pin
        keys = flatten(steps)
        future = FutureAccesses(keys)
        try:
            runs = [simulate(steps, lambda keys=keys: make(keys), capacity, per_layer=per_layer)
                    for _ in range(2)]
        except RuntimeError as exc:  # PolicyHookError: names the hook and the access
            _fail(label, "simulator", str(exc))
        if runs[0] != runs[1]:
            _fail(label, "simulator", "two simulations of one trace gave different counts")
        best = simulate(steps, lambda f=future: BeladyPolicy(f), capacity, per_layer=per_layer)
        if runs[0].misses < best.misses:
            _fail(label, "simulator", f"{runs[0].misses} misses, fewer than opt's "
                  f"{best.misses}: it must be using the future or breaking the pins")

