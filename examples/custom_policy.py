"""A new cache policy in ~20 lines: checked, registered, simulated on a trace, run live.

    python examples/custom_policy.py [MODEL_DIR]     # default: the shipped demo model

``check_policy`` runs the contract every policy must meet (``cache_policies.testing``) and
raises ``PolicyContractError`` saying what broke; CI runs it on this class
(``tests/test_policy_testing.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cache_policies import CachePolicy, ExpertKey, register_policy
from cache_policies.base import require_candidates
from cache_policies.sim_report import compare, format_table
from cache_policies.synthetic import synthetic_trace
from cache_policies.testing import check_policy


@register_policy
class MostRecentlyUsed(CachePolicy):
    """Evicts the most recently used expert (a classic foil for LRU on looping scans)."""

    name = "mru"

    def __init__(self) -> None:
        self.last: dict[ExpertKey, int] = {}
        self.clock = 0

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self.on_access(key, now)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self.clock += 1
        self.last[key] = self.clock

    def on_evict(self, key: ExpertKey) -> None:
        self.last.pop(key, None)

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        require_candidates(candidates)  # a ValueError that says what was wrong
        return max(candidates, key=lambda k: (self.last.get(k, 0), k))

    def reset(self) -> None:
        self.last.clear()
        self.clock = 0


def main(argv: list[str]) -> int:
    check_policy(MostRecentlyUsed)  # before trusting any number it gives
    trace = synthetic_trace(num_layers=8, num_experts=8, top_k=2, tokens=500, seed=0)
    rows = compare(trace, policies=["lru", "mru", "opt"], capacities=[2, 4])
    print(format_table(rows))

    import offload_rt  # the same class, live in the runtime, by its registered name
    from offload_rt.demo import demo_model_dir

    model_dir = argv[0] if argv else demo_model_dir()
    with offload_rt.load(model_dir, cache_experts=4, policy="mru", prefetch=0) as rt:
        out = rt.generate("The meaning of", max_new_tokens=16)
        print(repr(out.text), {k: out.stats[k] for k in ("hits", "misses", "hit_rate")})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
