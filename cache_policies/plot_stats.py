"""Plots of ``trace_stats`` (matplotlib: the optional ``plot`` extra).

Five panels: LRU and opt miss-ratio curves against slots (log axis; per-layer pools by slots
per layer, the global pool by slots in all), the reuse-distance histogram, each expert's share
of its layer's picks (a heat map, first trace), and the recorded predictions' precision by
target layer next to consecutive-token sharing. Several traces are
told apart by line style and marker; legends sit outside the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cache_policies.plot import _short
from cache_policies.trace_stats import TraceStats

_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v"]


def plot_stats(entries: Sequence[tuple[str, TraceStats]], out_png: str | Path) -> Path:
    """Write the panels for ``(label, stats)`` of one or more traces; ``RuntimeError`` naming
    the extra when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'offload_rt[plot]' "
                           "(or pip install matplotlib)") from exc
    if not entries:
        raise ValueError("no traces to plot")
    fig = Figure(figsize=(13, 12), layout="constrained")
    ax = fig.subplot_mosaic([["layer", "global"], ["hist", "pred"], ["heat", "heat"]])
    many = len(entries) > 1
    entries = [(_short(label), stats) for label, stats in entries]
    for i, (label, stats) in enumerate(entries):
        style = {"linestyle": _STYLES[i % 4], "marker": _MARKERS[i % 5], "markersize": 3}
        for pool in ("layer", "global"):
            _curves(ax[pool], stats, pool, label if many else "", style)
        _histogram(ax["hist"], stats, label if many else "", i, len(entries))
    plot_predictions(entries, ax["pred"])
    _heat(fig, ax["heat"], entries[0])
    for name in ("layer", "global", "hist", "pred"):
        ax[name].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
                        borderaxespad=0.0)
    fig.suptitle("Trace statistics" + ("" if many else f": {entries[0][0]}"))
    out = Path(out_png)
    fig.savefig(out, format="png", dpi=100)
    return out


def plot_predictions(entries: Sequence[tuple[str, TraceStats]], ax: Any) -> None:
    """Precision by target layer and sharing by layer, one line per trace and measure."""
    many = len(entries) > 1
    for i, (label, stats) in enumerate(entries):
        label = label if many else ""
        style = {"linestyle": _STYLES[i % 4], "marker": _MARKERS[i % 5]}
        by_target = sorted((t, s.precision) for t, s in stats.predictions.by_target.items()
                           if s.precision is not None)
        if by_target:
            ax.plot(*zip(*by_target), color="C0", label=f"precision {label}".strip(), **style)
        sharing = [(s.layer, s.sharing) for s in stats.layers if s.sharing is not None]
        if sharing:
            ax.plot(*zip(*sharing), color="C1", label=f"sharing {label}".strip(), **style)
    ax.set_xlabel("layer (predictions: the layer aimed at)")
    ax.set_ylim(0, 1)
    ax.set_title("recorded predictions' precision; consecutive-token sharing")
    ax.grid(True, alpha=0.3)


def _curves(ax: Any, stats: TraceStats, pool: str, label: str, style: dict[str, Any]) -> None:
    reuse = next(r for r in stats.reuse if r.pool == pool)
    for name, misses, colour in (("lru", reuse.lru_misses, "C0"),
                                 ("opt", reuse.opt_misses, "black")):
        points = sorted((s, m / reuse.accesses) for s, m in misses.items() if m)
        if points:
            ax.plot(*zip(*points), color=colour, label=f"{name} {label}".strip(), **style)
    ax.set_yscale("log")
    ax.set_ylabel("miss ratio (log scale)")
    ax.set_xlabel("slots per layer" if pool == "layer" else "slots in the global pool "
                  "(all layers)")
    ax.set_title(f"miss-ratio curves, {'per-layer' if pool == 'layer' else 'global'} pool")
    ax.grid(True, which="both", alpha=0.3)


def _histogram(ax: Any, stats: TraceStats, label: str, trace: int, traces: int) -> None:
    """Bars per bucket: 0, 1, 2-3, 4-7, ... (index = bit length), one group per pool."""
    groups = 2 * traces
    for p, (pool, colour) in enumerate((("layer", "C0"), ("global", "C2"))):
        reuse = next(r for r in stats.reuse if r.pool == pool)
        total = sum(reuse.histogram.values()) or 1
        slot = trace * 2 + p
        xs = [b.bit_length() + (slot + 0.5) / groups - 0.5 for b in reuse.histogram]
        ax.bar(xs, [n / total for n in reuse.histogram.values()], width=0.9 / groups,
               color=colour, alpha=1.0 - 0.5 * trace / max(1, traces),
               label=f"{pool} pool {label}".strip())
    top = max((b.bit_length() for r in stats.reuse for b in r.histogram), default=0)
    ax.set_xticks(range(top + 1), [str(b) if b < 2 else f"{b}-{2 * b - 1}"
                                   for b in [0] + [1 << i for i in range(top)]])
    ax.set_xlabel("reuse distance (distinct experts of the pool in between)")
    ax.set_ylabel("fraction of reuses")
    ax.set_title("reuse distances")
    ax.grid(True, axis="y", alpha=0.3)


def _heat(fig: Any, ax: Any, entry: tuple[str, TraceStats]) -> None:
    label, stats = entry
    shares = [layer.shares() for layer in stats.layers]
    image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"share of picks (uniform {1 / stats.num_experts:.3f})")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert popularity per layer ({label})")
