"""Hit rate against capacity, one line per policy (matplotlib: the optional ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cache_policies.sim_report import Row


def plot_hit_rates(rows: Sequence[Row], out_png: str | Path, title: str | None = None) -> Path:
    """Write a PNG of ``compare`` rows: x = slots per layer, y = hit rate, opt drawn on top.

    One line per (trace, pool, policy); ``opt`` is black, dashed and drawn last, so the bound
    every other line stays under is always visible. Raises ``RuntimeError`` naming the extra to
    install when matplotlib is missing.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'offload_rt[plot]' "
                           "(or pip install matplotlib)") from exc
    if not rows:
        raise ValueError("no rows to plot")
    lines: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        lines.setdefault((row.trace, row.pool, row.policy), []).append(row)
    several = len({(r.trace, r.pool) for r in rows}) > 1
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for (trace, pool, policy), points in sorted(lines.items(), key=lambda kv: kv[0][2] == "opt"):
        points = sorted(points, key=lambda r: r.capacity)
        label = f"{policy} ({trace or '-'}, {pool})" if several else policy
        style = ({"color": "black", "linestyle": "--", "linewidth": 2.2, "zorder": 10}
                 if policy == "opt" else {"linewidth": 1.5, "zorder": 2})
        ax.plot([r.capacity for r in points], [r.hit_rate for r in points], marker="o",
                label=label, **style)
    ax.set_xlabel("expert cache slots per layer")
    ax.set_ylabel("hit rate")
    low = min(r.hit_rate for r in rows)
    ax.set_ylim(max(0.0, int(low * 10 - 0.5) / 10), 1.0)  # a tenth under the lowest point
    ax.set_xticks(sorted({r.capacity for r in rows}))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("opt"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize="small")
    pools = ", ".join(sorted({r.pool for r in rows}))
    ax.set_title(title or f"Expert cache hit rate by policy ({pools} pool)")
    out = Path(out_png)
    fig.savefig(out, format="png", dpi=120)
    return out
