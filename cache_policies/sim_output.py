"""The simulator's report as a text table, JSON, and notes on rows whose options did nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache_policies.sim_report import Row


def format_table(rows: Sequence[Row], per_layer: bool = False) -> str:
    """A plain-text table, one line per row (plus per-layer hit rates when asked)."""
    header = ["trace", "pool", "capacity", "policy", "hit rate", "of opt", "misses",
              "MB/token"]
    lines = [header]
    for r in rows:
        lines.append([r.trace or "-", r.pool, str(r.capacity), r.policy, f"{r.hit_rate:.4f}",
                      "-" if r.of_opt is None else f"{r.of_opt:.3f}", str(r.misses),
                      "-" if r.bytes_per_token is None else f"{r.bytes_per_token / 1e6:.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if per_layer and n:
            rates = rows[n - 1].layer_hit_rates()
            out.append("    " + " ".join(f"L{layer}:{rate:.2f}" for layer, rate in rates.items()))
    return "\n".join(out + [f"note: {note}" for note in notes(rows)])


def rows_json(rows: Sequence[Row]) -> str:
    """One line of JSON: ``{"rows": [...], "notes": [...]}``, per-layer hits and misses in each
    row, ``notes`` as ``notes(rows)``."""
    return json.dumps({"rows": [r.as_dict() for r in rows], "notes": notes(rows)},
                      separators=(",", ":"))


def notes(rows: Sequence[Row]) -> list[str]:
    """What a row's policy name does not say: per trace, the rows that would have used
    predictions the trace does not hold (recorded with --prefetch 0, or synthetic without
    --predict-accuracy). ``router`` then ranks by recency alone, exactly as ``lru``."""
    out = []
    for label in dict.fromkeys(r.trace for r in rows):
        starved = [r for r in rows if r.trace == label and r.predictions is False]
        if not starved:
            continue
        names = list(dict.fromkeys(r.policy for r in starved))
        note = (f"{label or 'trace'}: no prefetch predictions in the trace (runs with "
                "--prefetch 0, and --synthetic without --predict-accuracy, record none), so "
                f"{', '.join(names)} ran without them")
        if "router" in names:
            note += "; router then ranks by recency alone, the same as lru"
        if any(r.prefetch for r in starved):
            note += "; the modelled --prefetch loaded nothing"
        out.append(note)
    return out
