"""Plots of ``compare`` rows (matplotlib: the optional ``plot`` extra).

One row of two panels per pool layout: the miss ratio (1 - hit rate) on a log axis, where
policies a few hundredths apart in hit rate separate, and each policy's fraction of its
reference (``opt``, or ``opt+prefetch`` for prefetch rows). The x-axis says what was varied:
slots per layer for per-layer pools, slots in all for a global pool. Colours name policies
(``opt`` black), line styles and markers name traces. One trace: a band shows its 95% bootstrap
interval over sequences. Several traces: each is drawn (``traces="each"``), or their mean with a
95% Student t band across traces (``traces="mean"``; the default from four traces on). Legends
sit outside the axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cache_policies.bootstrap import mean_ci
from cache_policies.rows import Row

_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_REFERENCES = {"opt": ("black", "--"), "opt+prefetch": ("black", ":")}


def plot_hit_rates(rows: Sequence[Row], out_png: str | Path, title: str | None = None,
                   traces: str = "auto") -> Path:
    """Write a PNG of ``compare`` rows (see the module docstring); ``traces``: "each",
    "mean" or "auto". ``RuntimeError`` naming the extra to install when matplotlib is
    missing, ``ValueError`` for no rows."""
    try:
        import matplotlib.figure  # noqa: F401 - fail here, with the message below
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'offload_rt[plot]' "
                           "(or pip install matplotlib)") from exc
    if not rows:
        raise ValueError("no rows to plot")
    out = Path(out_png)
    hit_rate_figure(rows, title, traces).savefig(out, format="png", dpi=120)
    return out


def hit_rate_figure(rows: Sequence[Row], title: str | None = None, traces: str = "auto") -> Any:
    """The ``matplotlib.figure.Figure`` that ``plot_hit_rates`` writes."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    labels = list(dict.fromkeys(r.trace for r in rows))
    mean = traces == "mean" or (traces == "auto" and len(labels) > 3)
    layouts = sorted({r.pool for r in rows}, key=lambda pool: pool != "layer")
    fig = Figure(figsize=(11, 4.2 * len(layouts)), layout="constrained")
    axes = fig.subplots(len(layouts), 2, squeeze=False)
    policies = list(dict.fromkeys(r.policy for r in rows))
    for (miss_ax, frac_ax), pool in zip(axes, layouts):
        part = [r for r in rows if r.pool == pool]
        for policy in policies:
            mine = [r for r in part if r.policy == policy]
            if mean:
                _draw_mean(miss_ax, frac_ax, mine, policy, policies)
            else:
                for i, label in enumerate(labels):
                    _draw(miss_ax, frac_ax, [r for r in mine if r.trace == label], policy,
                          policies, i, len(labels) == 1)
        _axes(miss_ax, frac_ax, pool, part)
    _legends(fig, axes[0][1], policies, labels, mean)
    fig.suptitle(title or "Expert cache by policy" + (f": {_short(labels[0], 60)}"
                                                      if len(labels) == 1 and labels[0] else ""))
    return fig


def _x(row: Row) -> int:
    return row.pool_slots


def _colour(policy: str, policies: list[str]) -> tuple[str, str]:
    if policy in _REFERENCES:
        return _REFERENCES[policy]
    others = [p for p in policies if p not in _REFERENCES]
    return f"C{others.index(policy) % 10}", "-"


def _draw(miss_ax: Any, frac_ax: Any, rows: list[Row], policy: str, policies: list[str],
          trace: int, band: bool) -> None:
    if not rows:
        return
    rows = sorted(rows, key=_x)
    colour, style = _colour(policy, policies)
    style = style if policy in _REFERENCES else _STYLES[trace % len(_STYLES)]
    kw = {"color": colour, "linestyle": style, "marker": _MARKERS[trace % len(_MARKERS)],
          "markersize": 4, "linewidth": 2.0 if policy in _REFERENCES else 1.4,
          "zorder": 10 if policy in _REFERENCES else 2}
    xs = [_x(r) for r in rows]
    miss_ax.plot(xs, [1 - r.hit_rate for r in rows], **kw)
    frac_ax.plot(xs, [r.of_opt if r.of_opt is not None else float("nan") for r in rows], **kw)
    if band:
        _bands(miss_ax, frac_ax, rows, xs, colour)


def _bands(miss_ax: Any, frac_ax: Any, rows: list[Row], xs: list[int], colour: str) -> None:
    """A trace's 95% bootstrap bands, at the sizes that have an interval (none where the
    reference has no hits, so ``of_opt`` has no value)."""
    nan = (float("nan"), float("nan"))
    hit = [r.ci.get("hit_rate", nan) for r in rows]
    frac = [r.ci.get("of_opt", nan) for r in rows]
    if any(r.ci.get("hit_rate") for r in rows):
        miss_ax.fill_between(xs, _on_log_axis([1 - high for _, high in hit]),
                             [1 - low for low, _ in hit], color=colour, alpha=0.15,
                             linewidth=0)
    if any(r.ci.get("of_opt") for r in rows):
        frac_ax.fill_between(xs, [low for low, _ in frac], [high for _, high in frac],
                             color=colour, alpha=0.15, linewidth=0)


def _draw_mean(miss_ax: Any, frac_ax: Any, rows: list[Row], policy: str,
               policies: list[str]) -> None:
    """Mean over traces at each size, with a 95% t band across them."""
    colour, style = _colour(policy, policies)
    xs = sorted({_x(r) for r in rows})
    for ax, value in ((miss_ax, lambda r: 1 - r.hit_rate), (frac_ax, lambda r: r.of_opt)):
        stats = [mean_ci([value(r) for r in rows if _x(r) == x and value(r) is not None])
                 for x in xs]
        ax.plot(xs, [m for m, _ in stats], color=colour, linestyle=style, marker="o",
                markersize=4, linewidth=1.6)
        if all(ci is not None for _, ci in stats):
            low = [ci[0] for _, ci in stats]  # type: ignore[index]
            ax.fill_between(xs, _on_log_axis(low) if ax is miss_ax else low,
                            [ci[1] for _, ci in stats],  # type: ignore[index]
                            color=colour, alpha=0.15, linewidth=0)


def _on_log_axis(values: list[float]) -> list[float]:
    """A band's lower edge on the log miss-ratio axis: a bound at or below 0 (an interval
    reaching a miss ratio of 0, e.g. where only the first sequence's cold misses remain) has no
    place there, so the band leaves that size out instead of filling down to the axis."""
    return [v if v > 0 else float("nan") for v in values]


def _axes(miss_ax: Any, frac_ax: Any, pool: str, rows: list[Row]) -> None:
    sized = "slots per layer" if pool == "layer" else "slots in the global pool (all layers)"
    miss_ax.set_yscale("log")
    miss_ax.set_ylabel("miss ratio (log scale)")
    frac_ax.set_ylabel("fraction of opt (hit rate / opt's)")
    for ax in (miss_ax, frac_ax):
        ax.set_xlabel(f"expert cache: {sized}")
        ax.grid(True, which="both", alpha=0.3)
        xs = sorted({_x(r) for r in rows})
        if len(xs) <= 16:
            ax.set_xticks(xs)
    miss_ax.set_title(f"{'per-layer' if pool == 'layer' else 'global'} pool: miss ratio")
    frac_ax.set_title(f"{'per-layer' if pool == 'layer' else 'global'} pool: fraction of opt")


def _legends(fig: Any, ax: Any, policies: list[str], labels: list[str], mean: bool) -> None:
    """Policies (colours) and traces (styles) in legends to the right of the panels."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_colour(p, policies)[0], linestyle=_colour(p, policies)[1],
                      linewidth=2, label=p) for p in policies]
    if mean:
        handles.append(Line2D([], [], color="grey", alpha=0.4, linewidth=6,
                              label=f"95% t band, {len(labels)} traces"))
    elif len(labels) > 1:
        handles += [Line2D([], [], color="grey", linestyle=_STYLES[i % len(_STYLES)],
                           marker=_MARKERS[i % len(_MARKERS)], label=_short(label))
                    for i, label in enumerate(labels)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
              borderaxespad=0.0)


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[:12] + "..." + label[-(width - 15):]
