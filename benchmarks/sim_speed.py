"""How fast the trace simulator replays LRU: prints JSON {"accesses_per_s": ...}.

The trace is synthetic but shaped like Mixtral 8x7B decoding: 32 layers x 8 experts, top-2 per
token, and a token reuses the previous token's pair at a layer half of the time (the paper
reports 45-67% overlap), so hits and misses both occur. 2,000,000 accesses, 4 slots per layer.
Usage: python benchmarks/sim_speed.py [--accesses N] [--capacity C] [--global-pool]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from cache_policies import ExpertKey, LRUPolicy, simulate

LAYERS, EXPERTS, TOP_K = 32, 8, 2


def synthetic_trace(accesses: int, seed: int = 0) -> list[tuple[ExpertKey, ...]]:
    """Steps of TOP_K distinct experts per layer per token, with token-to-token locality."""
    rng = random.Random(seed)
    keys = [[ExpertKey(layer, e) for e in range(EXPERTS)] for layer in range(LAYERS)]
    previous: list[tuple[ExpertKey, ...]] = [tuple(row[:TOP_K]) for row in keys]
    steps: list[tuple[ExpertKey, ...]] = []
    while len(steps) * TOP_K < accesses:
        for layer in range(LAYERS):
            if rng.random() >= 0.5:
                previous[layer] = tuple(rng.sample(keys[layer], TOP_K))
            steps.append(previous[layer])
    return steps[: accesses // TOP_K]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accesses", type=int, default=2_000_000)
    parser.add_argument("--capacity", type=int, default=4, help="slots per layer (or in total)")
    parser.add_argument("--global-pool", action="store_true", help="one pool for all layers")
    args = parser.parse_args()
    trace = synthetic_trace(args.accesses)
    start = time.perf_counter()
    result = simulate(trace, LRUPolicy, args.capacity, per_layer=not args.global_pool)
    seconds = time.perf_counter() - start
    report = {
        "accesses_per_s": round(result.accesses / seconds),
        "accesses": result.accesses,
        "seconds": round(seconds, 3),
        "hit_rate": round(result.hit_rate, 4),
        "policy": result.policy,
        "capacity": args.capacity,
        "per_layer": not args.global_pool,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
