"""Readable policy plots (issue 17, item 6): policies within 0.03 hid each other on a 0-1
axis, several traces' opt lines were identical black dashes, long legend labels covered the
curves, and the global plot's x-axis said "slots per layer"."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache_policies.compare import compare
from cache_policies.synthetic import synthetic_trace

matplotlib = pytest.importorskip("matplotlib")
from cache_policies.plot import hit_rate_figure, plot_hit_rates


def rows_of(*seeds: int, sequences: int = 1) -> list:
    rows = []
    for seed in seeds:
        trace = synthetic_trace(num_layers=3, num_experts=6, top_k=2, tokens=60, seed=seed,
                                sequences=sequences)
        rows += compare(trace, ["lru", "lfu", "opt"], [2, 4], slots=[5, 9],
                        label=f"a-rather-long-folder-name/trace-{seed}.jsonl.gz")
    return rows


def lines_of(ax: object, colour: str) -> list:
    return [line for line in ax.get_lines() if matplotlib.colors.to_hex(line.get_color()) ==
            matplotlib.colors.to_hex(colour)]


def test_panels_axes_and_scales() -> None:
    fig = hit_rate_figure(rows_of(1))
    (miss_l, frac_l), (miss_g, frac_g) = [fig.axes[i:i + 2] for i in (0, 2)]
    assert miss_l.get_yscale() == "log" and frac_l.get_yscale() == "linear"
    assert miss_l.get_xlabel().endswith("slots per layer")
    assert miss_g.get_xlabel().endswith("slots in the global pool (all layers)")
    assert "fraction of opt" in frac_g.get_ylabel()


def test_each_trace_has_its_own_style_and_opt_lines_differ() -> None:
    fig = hit_rate_figure(rows_of(1, 2), traces="each")
    opt = lines_of(fig.axes[0], "black")
    assert len(opt) == 2
    assert opt[0].get_marker() != opt[1].get_marker()
    lru = lines_of(fig.axes[0], "C0")
    assert len({line.get_linestyle() for line in lru}) == 2


def test_legends_sit_outside_the_axes_with_short_labels() -> None:
    fig = hit_rate_figure(rows_of(1, 2), traces="each")
    legend = fig.axes[1].get_legend()
    anchor = legend.get_bbox_to_anchor().transformed(fig.axes[1].transAxes.inverted())
    assert anchor.x0 > 1.0  # right of the axes, not over the curves
    assert all(len(t.get_text()) <= 28 for t in legend.get_texts())


def test_mean_and_interval_bands() -> None:
    fig = hit_rate_figure(rows_of(1, 2, 3, 4))  # four traces: mean +- t band
    assert len(lines_of(fig.axes[0], "black")) == 1 and fig.axes[0].collections
    one = hit_rate_figure(rows_of(5, sequences=4))  # one trace, bootstrap band
    assert one.axes[0].collections


def test_png_is_written(tmp_path: Path) -> None:
    out = plot_hit_rates(rows_of(1), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def band_vertices(ax: object) -> list[tuple[float, float]]:
    return [tuple(v) for c in ax.collections for path in c.get_paths() for v in path.vertices]


def test_bands_on_the_log_axis_stay_above_zero_and_partial_bands_are_drawn() -> None:
    """An interval reaching a miss ratio of 0 (only the first sequence's cold misses left at
    the largest size) filled down the whole axis; a band was dropped entirely when one size
    had no interval (opt with no hits: no fraction)."""
    from dataclasses import replace

    rows = [r for r in rows_of(5, sequences=4) if r.pool == "layer" and r.policy == "lru"]
    rows = [replace(rows[0], ci={"hit_rate": (0.5, 0.6)}),
            replace(rows[1], ci={"hit_rate": (0.9, 1.0), "of_opt": (0.9, 1.0)}),
            replace(rows[1], pool_slots=5, ci={"hit_rate": (0.95, 1.0), "of_opt": (0.95, 1.0)})]
    fig = hit_rate_figure(rows)
    miss_ax, frac_ax = fig.axes[:2]
    assert all(y > 0 for _, y in band_vertices(miss_ax))
    assert {x for x, _ in band_vertices(frac_ax)} >= {4, 5}
    assert fig._suptitle.get_text().startswith("Expert cache by policy: a-rather-long")
