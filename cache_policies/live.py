"""The recorded run against its replay: the hits and misses the runtime measured, per sequence.

A trace written by ``offload-rt trace`` keeps the run's policy, pool layout and size in its
header, and what the runtime measured for each generation (``sequences[i].measured``). Replaying
the trace through the same policy at the same size gives exactly those counts when the run
had prefetch off (``tests/test_trace_replay.py``); with prefetch on, background loads race with
compute and the replay only models them, and with hybrid miss handling (the header's
``hybrid`` not "off") a miss the CPU computed never entered the device cache, which the replay
does not model: the counts are then shown side by side, not matched.
"""

from __future__ import annotations

from typing import Any

from cache_policies.policy_errors import PolicyHookError
from cache_policies.registry import make_policy
from cache_policies.replay import replay
from cache_policies.segments import trace_segments
from cache_policies.trace import Trace


def live_check(trace: Trace, label: str = "") -> dict[str, Any] | None:
    """``{"trace", "policy", "pool", "pool_slots", "pool_capacities" (each layer's pool when
    they differ, else None), "prefetch", "hybrid", "measured": {hits, misses,
    per_sequence}, "replayed": {...}, "exact": bool, "expected_exact": bool}``, or None when
    the header lacks the run's settings or measurements (a resident run, a synthetic trace).
    ``"error"`` replaces ``"replayed"`` when the run's policy cannot be built here."""
    h = trace.header
    measured = [s.get("measured") for s in h.sequences if isinstance(s, dict)]
    if not (h.policy and h.capacity and h.pool in ("layer", "global")) or not measured or \
            any(not isinstance(m, dict) for m in measured):
        return None
    out: dict[str, Any] = {"trace": label, "policy": h.policy, "pool": h.pool,
                           "pool_slots": h.capacity, "pool_capacities": h.pool_capacities,
                           "prefetch": h.prefetch,
                           "measured": _totals([(m["hits"], m["misses"]) for m in measured]),
                           "hybrid": h.hybrid,
                           "expected_exact": h.prefetch == 0 and h.hybrid == "off"}
    try:
        sim = replay(trace, lambda: make_policy(h.policy), h.pool_capacities or h.capacity,
                     per_layer=h.pool == "layer", prefetch=h.prefetch > 0).sim
    except (ValueError, PolicyHookError) as exc:
        out["error"] = f"cannot replay policy {h.policy!r} here: {exc}"
        return out
    per_seq: dict[int, list[int]] = {}
    for seg, hits, misses in zip(trace_segments(trace), sim.segment_hits, sim.segment_misses):
        counts = per_seq.setdefault(seg.seq, [0, 0])
        counts[0] += hits
        counts[1] += misses
    out["replayed"] = _totals([tuple(per_seq.get(i, (0, 0))) for i in range(len(measured))])
    out["exact"] = out["replayed"] == out["measured"]
    return out


def _totals(per_seq: list[tuple[int, int]]) -> dict[str, Any]:
    return {"hits": sum(h for h, _ in per_seq), "misses": sum(m for _, m in per_seq),
            "per_sequence": [[h, m] for h, m in per_seq]}


def live_note(check: dict[str, Any]) -> str:
    """One line for the table's notes."""
    size = f"{check['pool_slots']} {'per layer' if check['pool'] == 'layer' else 'total'}"
    if check.get("pool_capacities"):
        size = f"{min(check['pool_capacities'])}-{max(check['pool_capacities'])} per layer"
    m = check["measured"]
    head = (f"{check['trace'] or 'trace'}: the recorded run ({check['policy']}, {size}, "
            f"prefetch {check['prefetch']}) measured {m['hits']} hits / {m['misses']} misses")
    if "error" in check:
        return f"{head}; {check['error']}"
    r = check["replayed"]
    if check["exact"]:
        return f"{head}; its replay gives the same, sequence by sequence"
    why = ("MISMATCH: please report it with the trace" if check["expected_exact"] else
           "prefetch raced with compute in the run; the replay models it" if check["prefetch"]
           else f"the run computed some misses on the CPU (hybrid {check['hybrid']}): they "
           "never entered the cache, which the replay does not model")
    return f"{head}; its replay gives {r['hits']} / {r['misses']} ({why})"
