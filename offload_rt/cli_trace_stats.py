"""``offload-rt trace-stats``: what routing traces say about locality, before any policy.

    offload-rt trace-stats run.trace.jsonl.gz [more.trace.jsonl.gz ...] [--json] [--plot s.png]
    offload-rt trace-stats --synthetic --layers 32 --experts 128 --top-k 8 --tokens 2000

Reuse distances, LRU and Belady miss-ratio curves for both pool layouts, per-layer
expert popularity and consecutive-token sharing, and the recorded predictions' precision and
recall per target layer and lookahead (``cache_policies.trace_stats``). Parses and calls only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from offload_rt.cli_checks import check_output_path, write_output
from offload_rt.cli_traces import add_trace_inputs, input_notes, load_traces
from offload_rt.errors import OptionError


def add_trace_stats_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None
                           ) -> argparse.ArgumentParser:
    """Register ``trace-stats``."""
    parser = subparsers.add_parser(
        "trace-stats", parents=parents or [], help="reuse, popularity and prediction "
        "statistics of routing traces",
        description="Statistics of routing traces (from `offload-rt trace`, or synthetic): "
                    "reuse distances, LRU and opt miss-ratio curves (one pass; smaller pools "
                    "than a forward call's experts simulated) for per-layer "
                    "and global pools, per-layer expert popularity and consecutive-token "
                    "sharing, and the recorded predictions' precision and recall by target "
                    "layer and lookahead. Prints a report, or one JSON line with --json.")
    add_trace_inputs(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON line instead")
    out.add_argument("--plot", metavar="PNG", type=Path, help="also write the panels (needs "
                     "matplotlib: pip install '.[plot]' in the source tree)")
    parser.set_defaults(run=run_trace_stats)
    return parser


def run_trace_stats(args: argparse.Namespace) -> int:
    """Load the traces, compute, print; ``OptionError`` for bad inputs or outputs."""
    from cache_policies.stats_output import stats_dict, stats_json, stats_table
    from cache_policies.trace_stats import trace_stats

    for path, flag in ((args.save_trace, "--save-trace"), (args.plot, "--plot")):
        if path is not None:
            check_output_path(path, flag)
    loaded = load_traces(args)
    computed = [(label, path, trace, trace_stats(trace)) for label, path, trace in loaded]
    notes = input_notes(args)
    if args.plot is not None:
        _plot([(label, stats) for label, _, _, stats in computed], args.plot)
    if args.json:
        print(stats_json([stats_dict(*entry) for entry in computed], notes), flush=True)
    else:
        reports = [stats_table(label, trace, stats) for label, _, trace, stats in computed]
        print("\n\n".join(reports + [f"note: {n}" for n in notes]), flush=True)
    return 0


def _plot(entries: list[tuple[str, Any]], path: Path) -> None:
    from cache_policies.plot_stats import plot_stats

    try:
        write_output(path, "--plot", lambda p: plot_stats(entries, p))
    except RuntimeError as exc:  # matplotlib missing
        raise OptionError(str(exc)) from exc
    print(f"wrote {path}", file=sys.stderr)
