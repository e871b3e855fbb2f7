"""``trace_stats`` as a text report and as JSON (``offload-rt trace-stats``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cache_policies.trace import Trace
from cache_policies.trace_stats import LayerStats, ReuseStats, TraceStats

_CURVE_POINTS = 12  # sizes shown per curve in the table (JSON has every size)


def stats_dict(label: str, path: str, trace: Trace, stats: TraceStats) -> dict[str, Any]:
    """One trace's statistics as JSON-ready values."""
    h = trace.header
    return {
        "trace": label, "path": path,
        "shape": {"num_layers": h.num_layers, "num_experts": h.num_experts, "top_k": h.top_k,
                  "tokens": trace.num_tokens, "sequences": len({r.seq for r in trace.records}),
                  "records": len(trace.records)},
        "reuse": [{"pool": r.pool, "accesses": r.accesses, "first_uses": r.first_uses,
                   "histogram": {str(k): v for k, v in r.histogram.items()},
                   "quantiles": r.quantiles,
                   "miss_ratio": {"lru": _ratios(r.lru_misses, r.accesses),
                                  "opt": _ratios(r.opt_misses, r.accesses)},
                   "simulated_sizes": list(r.simulated)}
                  for r in stats.reuse],
        "layers": [{"layer": s.layer, "tokens": s.tokens, "picks": list(s.picks),
                    "shares": s.shares(), "entropy": s.entropy, "sharing": s.sharing,
                    "sharing_uniform": s.sharing_uniform} for s in stats.layers],
        "predictions": stats.predictions.as_dict(),
    }


def stats_json(entries: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """One line: ``{"traces": [stats_dict, ...], "notes": [...]}``."""
    return json.dumps({"traces": list(entries), "notes": list(notes)}, separators=(",", ":"))


def _ratios(misses: dict[int, int], accesses: int) -> dict[str, float]:
    return {str(size): m / accesses for size, m in misses.items()} if accesses else {}


def stats_table(label: str, trace: Trace, stats: TraceStats) -> str:
    """The report of one trace: reuse, curves, layers, predictions."""
    h = trace.header
    seqs = len({r.seq for r in trace.records})
    lines = [(f"{label}: {h.num_layers} layers x {h.num_experts} experts, top-{h.top_k}; "
             f"{trace.num_tokens} tokens in {seqs} sequence(s)"), "",
             "reuse distance (distinct experts of the pool used since the previous use):"]
    lines += _table([_reuse_row(r) for r in stats.reuse],
                    ["pool", "accesses", "first uses", "p50", "p90", "p99", "histogram"])
    lines += ["", "miss ratio by slots per pool (lru / opt):"]
    for r in stats.reuse:
        lines.append(f"  {r.pool:<6}  " + "  ".join(_curve_points(r)))
    if any(r.simulated for r in stats.reuse):
        lines.append("  (*: simulated: a forward call acquires more experts of a pool than it "
                     "has slots, so it is split into groups; the other sizes: one pass)")
    lines += ["", ("layers (pick shares: uniform is "
              f"{1 / max(1, h.num_experts):.3f}; sharing: consecutive tokens of a sequence "
              "sharing >= 1 expert):")]
    lines += _table([_layer_row(s) for s in stats.layers],
                    ["layer", "tokens", "share min-max", "entropy", "sharing", "if uniform"])
    lines += ["", *_prediction_lines(stats)]
    return "\n".join(lines)


def _reuse_row(r: ReuseStats) -> list[str]:
    hist = " ".join(f"{_bucket(k)}:{v}" for k, v in r.histogram.items())
    q = r.quantiles
    return [r.pool, str(r.accesses), str(r.first_uses), str(q.get("p50", "-")),
            str(q.get("p90", "-")), str(q.get("p99", "-")), hist]


def _bucket(start: int) -> str:
    return str(start) if start < 2 else f"{start}-{2 * start - 1}"


def _curve_points(r: ReuseStats) -> list[str]:
    sizes = sorted(r.lru_misses)
    if len(sizes) > _CURVE_POINTS:
        step = (len(sizes) - 1) / (_CURVE_POINTS - 1)
        sizes = sorted({sizes[round(i * step)] for i in range(_CURVE_POINTS)})
    out = []
    for size in sizes:
        opt = r.opt_misses.get(size)
        mark = "*" if size in r.simulated else ""
        out.append(f"{size}{mark}: {r.lru_misses[size] / r.accesses:.3f}/"
                   f"{'-' if opt is None else f'{opt / r.accesses:.3f}'}")
    return out


def _layer_row(s: LayerStats) -> list[str]:
    shares = s.shares()
    return [str(s.layer), str(s.tokens), f"{min(shares):.3f}-{max(shares):.3f}",
            f"{s.entropy:.3f}", "-" if s.sharing is None else f"{s.sharing:.3f}",
            f"{s.sharing_uniform:.3f}"]


def _prediction_lines(stats: TraceStats) -> list[str]:
    p = stats.predictions
    if not p.overall.predictions:
        return [("predictions: none recorded (a run with --prefetch 0, or synthetic without "
                "--predict-accuracy)")]
    rows = [[f"layer {t}", str(s.predictions), _fmt(s.precision), _fmt(s.recall)]
            for t, s in sorted(p.by_target.items())]
    rows += [[f"{a} ahead", str(s.predictions), _fmt(s.precision), _fmt(s.recall)]
             for a, s in sorted(p.by_lookahead.items())]
    rows.append(["overall", str(p.overall.predictions), _fmt(p.overall.precision),
                 _fmt(p.overall.recall)])
    return ["recorded predictions (scored against the experts the call then used):",
            *_table(rows, ["aimed at", "predictions", "precision", "recall"])]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
            for line in lines]
