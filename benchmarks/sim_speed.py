"""How fast the research kit replays traces: prints one JSON line per measurement.

Two synthetic traces (``cache_policies.synthetic``, Zipf 1.1, locality 0.5, 2000 decode tokens):
Mixtral 8x7B's shape (32 layers x 8 experts, top-2: 128,000 accesses) and a 128-expert top-8
model (32 layers: 512,000 accesses). For each pool layout, measured:

* ``simulate``: LRU replayed at one size (accesses/s);
* ``lru_curve`` / ``opt_curve``: the one-pass stack depths, misses at every size at once;
* ``sweep``: ``compare`` with lru and opt at every valid size (``--capacity all`` or
  ``--slots all``), intervals off; opt's stack is cut at the largest size asked for, so a
  sweep up to ``--max-slots`` costs less than one over all of a 4096-slot pool;
* ``trace_stats``: everything ``offload-rt trace-stats`` computes, both layouts (opt's global
  curve uncut: every size up to layers x experts).

    python benchmarks/sim_speed.py [--tokens 2000] [--max-slots 512] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from cache_policies import LRUPolicy, simulate
from cache_policies.compare import compare
from cache_policies.stack_distance import lru_depths, opt_depths
from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from cache_policies.trace import Trace
from cache_policies.trace_stats import trace_stats

SHAPES = {"mixtral-8x7b": (32, 8, 2), "128-experts-top-8": (32, 128, 8)}


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def measure(shape: str, tokens: int, max_slots: int) -> list[dict[str, Any]]:
    """One row per pool layout for the synthetic trace of ``shape``."""
    layers, experts, top_k = SHAPES[shape]
    trace = synthetic_trace(SyntheticSpec(num_layers=layers, num_experts=experts, top_k=top_k,
                                          tokens=tokens, seed=0))
    rows = [{"shape": shape, **measure_layout(trace, per_layer, max_slots)}
            for per_layer in (True, False)]
    seconds, _ = timed(lambda: trace_stats(trace))
    return [*rows, {"shape": shape, "pool": "both", "trace_stats_s": round(seconds, 2)}]


def measure_layout(trace: Trace, per_layer: bool, max_slots: int) -> dict[str, Any]:
    """Seconds of each measurement on one pool layout (see the module docstring)."""
    h = trace.header
    steps = trace.access_steps()
    accesses = sum(map(len, steps))
    size = h.num_experts // 2 if per_layer else h.num_layers * h.num_experts // 4
    seconds, sim = timed(lambda: simulate(steps, LRUPolicy, size, per_layer=per_layer))
    row = {"pool": "layer" if per_layer else "global", "accesses": accesses,
           "simulate_lru_s": round(seconds, 2), "simulate_size": size,
           "accesses_per_s": round(accesses / seconds), "hit_rate": round(sim.hit_rate, 4),
           "lru_curve_s": round(timed(lambda: lru_depths(steps, per_layer))[0], 2),
           "opt_curve_s": round(timed(lambda: opt_depths(steps, per_layer))[0], 2)}
    if per_layer:
        sizes = list(range(h.top_k, h.num_experts + 1))
        sweep = {"capacities": sizes, "slots": []}
    else:
        sizes = list(range(h.top_k, min(max_slots, h.num_layers * h.num_experts) + 1))
        sweep = {"capacities": [], "slots": sizes}
    seconds, rows = timed(lambda: compare(trace, ["lru", "opt"], resamples=0, **sweep))
    row.update(sweep_sizes=f"{sizes[0]}..{sizes[-1]}", sweep_s=round(seconds, 2),
               sweep_methods=sorted({r.method for r in rows}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--max-slots", type=int, default=512,
                        help="largest global pool of the sweep (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="200 tokens (a smoke run)")
    args = parser.parse_args()
    for shape in SHAPES:
        for row in measure(shape, 200 if args.quick else args.tokens, args.max_slots):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
