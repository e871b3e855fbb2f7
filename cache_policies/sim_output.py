"""The simulator's report as a text table, JSON, and notes on what a row's numbers do not say."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cache_policies.segments import DECODE, PREFILL

if TYPE_CHECKING:
    from cache_policies.rows import Row

ABOVE_OPT = "^"  # marks a hit rate above opt's (modelled prefetch)


def format_table(rows: Sequence[Row], per_layer: bool = False,
                 extra_notes: Sequence[str] = ()) -> str:
    """A plain-text table, one line per row (plus per-layer hit rates when asked), then the
    notes. Columns: the pool size in slots (``4 per layer`` or ``24 total``), hit rate and its
    95% interval (when the trace has several sequences), the fraction of the reference
    (``opt``; ``opt+prefetch`` for prefetch rows), decode and prefill hit rates (when the trace
    has both), misses per token and MB moved per token."""
    ci = any(r.ci for r in rows)
    phases = any(r.phase(PREFILL) and r.phase(DECODE) for r in rows)
    header = ["trace", "pool", "slots", "policy", "hit rate"] + (["95% CI"] if ci else []) + \
        ["of opt"] + (["decode", "prefill"] if phases else []) + ["misses", "MB/token"]
    lines = [header] + [_cells(r, ci, phases) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if per_layer and n:
            rates = rows[n - 1].layer_hit_rates()
            out.append("    " + " ".join(f"L{layer}:{rate:.2f}" for layer, rate in rates.items()))
    return "\n".join(out + [f"note: {note}" for note in [*notes(rows), *extra_notes]])


def _cells(r: Row, ci: bool, phases: bool) -> list[str]:
    cells = [r.trace or "-", r.pool, r.size().label(), r.policy,
             f"{r.hit_rate:.4f}" + (ABOVE_OPT if r.above_opt else "")]
    if ci:
        low_high = r.ci.get("hit_rate")
        cells.append(f"{low_high[0]:.3f}-{low_high[1]:.3f}" if low_high else "-")
    cells.append("-" if r.of_opt is None else f"{r.of_opt:.3f}")
    if phases:
        for phase in (DECODE, PREFILL):
            part = r.phase(phase)
            rate = part["hit_rate"] if part else None
            cells.append("-" if rate is None else f"{rate:.4f}")
    cells += [str(r.misses),
              "-" if r.bytes_per_token is None else f"{r.bytes_per_token / 1e6:.2f}"]
    return cells


def rows_json(rows: Sequence[Row], extra_notes: Sequence[str] = (),
              live: Sequence[dict[str, object]] = ()) -> str:
    """One line of JSON: ``{"rows": [...], "notes": [...], "live": [...]}``; each row as
    ``Row.as_dict`` (per-layer counts, phases, sequences, intervals), ``notes`` as
    ``notes(rows)`` plus ``extra_notes``, ``live`` the replays of the recorded runs
    (``cache_policies.live``)."""
    return json.dumps({"rows": [r.as_dict() for r in rows],
                       "notes": [*notes(rows), *extra_notes], "live": list(live)},
                      separators=(",", ":"))


def notes(rows: Sequence[Row]) -> list[str]:
    """What a row's numbers do not say: rows that would have used predictions the trace does
    not hold (``router`` then ranks by recency alone, exactly as ``lru``), what prefetch rows
    are compared with, and where the intervals come from."""
    out = [note for label in dict.fromkeys(r.trace for r in rows)
           if (note := _starved([r for r in rows if r.trace == label], label))]
    if any(r.above_opt for r in rows):
        out.append(f"{ABOVE_OPT}: above opt, the demand-paging optimum: with modelled "
                   "prefetch, loading a predicted expert is not a miss (MB/token counts it)")
    if any(r.prefetch and r.reference != "opt" for r in rows):
        out.append("--prefetch rows: 'of opt' is the fraction of opt+prefetch, the most hits "
                   "any policy can get when every predicted expert may be loaded for free "
                   "(docs/evaluating_policies.md)")
    with_ci = [r for r in rows if r.ci]
    if with_ci:
        counts = sorted({len({s.seq for s in r.segments}) for r in with_ci})
        out.append("95% CI: percentile bootstrap over the trace's sequences "
                   f"({'/'.join(map(str, counts))} sequences); hit rates are pooled over them")
    return out


def _starved(rows: Sequence[Row], label: str) -> str | None:
    starved = [r for r in rows if r.predictions is False]
    if not starved:
        return None
    names = list(dict.fromkeys(r.policy for r in starved))
    note = (f"{label or 'trace'}: no prefetch predictions in the trace (runs with "
            "--prefetch 0, and --synthetic without --predict-accuracy, record none), so "
            f"{', '.join(names)} ran without them")
    if "router" in names:
        note += "; router then ranks by recency alone, the same as lru"
    return note
