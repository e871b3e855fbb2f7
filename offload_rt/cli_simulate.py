"""``offload-rt simulate`` (replay traces through policies) and ``offload-rt trace`` (record one).

    offload-rt trace [MODEL_DIR] --prompt "Hello" --max-new-tokens 64 -o run.trace.jsonl.gz
    offload-rt simulate run.trace.jsonl.gz --policies lru,lfu,opt --capacity 2,4,6 --plot hr.png
    offload-rt simulate run.trace.jsonl.gz --slots 7,17,24       # one global pool, slots in all
    offload-rt simulate --synthetic --layers 32 --experts 8 --tokens 2000 --zipf 1.1

Both only parse and call: ``offload_rt.trace_recorder`` records, ``cache_policies.sim_report``
replays and tabulates (``cache_policies.pool_sizes`` checks the sizes, ``cache_policies.live``
sets the recorded run against its replay), ``cache_policies.plot`` draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cache_policies.live import live_check, live_note
from cache_policies.policy_errors import PolicyHookError
from cache_policies.pool_sizes import capacities, global_slots, parse_sizes
from cache_policies.sim_report import DEFAULT_POLICIES, Row, compare, format_table, rows_json
from cache_policies.trace import Trace, write_trace
from offload_rt.cli_checks import check_output_path, write_output
from offload_rt.cli_traces import add_trace_inputs, input_notes, load_traces
from offload_rt.errors import OptionError, PolicyError
from offload_rt.text_input import BOM, check_text, decode_text


def add_simulate_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None
                        ) -> argparse.ArgumentParser:
    """Register ``simulate`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "simulate", parents=parents or [], help="replay routing traces through cache policies",
        description="Replay routing traces (from `offload-rt trace`, or synthetic ones) through "
                    "expert-cache eviction policies at several pool sizes, next to the optimal "
                    "(Belady) policy. Prints a table, or one JSON line with --json.")
    add_trace_inputs(parser)
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--policies", metavar="LIST", type=_names, default=list(DEFAULT_POLICIES),
                     help="comma-separated policy names or pkg.module:Class paths "
                          f"(default: {','.join(DEFAULT_POLICIES)})")
    sim.add_argument("--capacity", metavar="LIST", type=_sizes, default=None,
                     help="slots PER LAYER to try, comma-separated or 'all', each from the "
                          "trace's top_k to its experts per layer (the runtime's "
                          "--cache-experts); with --pool global one pool of this many times "
                          "the layers (default, unless --slots is given: those of 2,4,6 in "
                          "that range, else top_k)")
    sim.add_argument("--slots", metavar="LIST", type=_sizes, default=None,
                     help="slots IN TOTAL of one global pool, comma-separated or 'all', from "
                          "top_k to layers x experts: what a --pool global budget holds (e.g. "
                          "7,17,24); rows say 'N total'")
    sim.add_argument("--pool", choices=("layer", "global"), default=None,
                     help="the layout --capacity sizes: a pool per layer, or one shared pool "
                          "(default: layer)")
    sim.add_argument("--prefetch", action="store_true",
                     help="model prefetch: recorded predictions are loaded before the next "
                          "layer runs; adds opt+prefetch, the bound for these rows (opt stays "
                          "demand-only; a trace recorded with --prefetch 0 has none: a note "
                          "says so)")
    sim.add_argument("--expert-bytes", metavar="N", type=_positive, default=None,
                     help="bytes of one expert for MB/token, >= 1 (default: the trace's)")
    sim.add_argument("--resamples", metavar="N", type=_count, default=2000,
                     help="bootstrap resamples for the 95%% intervals over a trace's sequences "
                          "(0: none; default: %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    out.add_argument("--per-layer", action="store_true", help="add per-layer hit rates to the table")
    out.add_argument("--plot", metavar="PNG", type=Path, help="also write plots: miss ratio "
                     "(log axis) and fraction of opt against slots, one panel per pool layout "
                     "(needs matplotlib: pip install '.[plot]' in the source tree)")
    parser.set_defaults(run=run_simulate)
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    """Load or generate traces, compare policies, print; errors become ``OptionError`` (a
    policy's own error ``PolicyError``, naming its class and hook)."""
    for path, flag in ((args.save_trace, "--save-trace"), (args.plot, "--plot")):
        if path is not None:
            check_output_path(path, flag)  # before the simulation, not after it
    rows: list[Row] = []
    live = []
    trace_notes = []
    for label, path, trace in load_traces(args):
        rows += _compare(args, label, path, trace)
        if args.prefetch and not trace.has_predictions:
            trace_notes.append(f"{label}: --prefetch: no effect: the trace holds no predictions "
                               "(recorded with --prefetch 0, or --synthetic without "
                               "--predict-accuracy), so the modelled --prefetch loaded nothing")
        check = live_check(trace, label)
        if check is not None:
            live.append(check)
    if args.plot is not None:
        _plot(rows, args.plot)
    notes = [*flag_notes(args), *trace_notes, *(live_note(c) for c in live)]
    print(rows_json(rows, notes, live) if args.json else
          format_table(rows, per_layer=args.per_layer, extra_notes=notes), flush=True)
    return 0


def _compare(args: argparse.Namespace, label: str, path: str, trace: Trace) -> list[Row]:
    try:
        caps = capacities(trace.header, args.capacity, label) \
            if args.capacity is not None or args.slots is None else []
        slots = global_slots(trace.header, args.slots, label)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    try:
        return compare(trace, args.policies, caps, per_layer=args.pool != "global",
                       prefetch=args.prefetch, slots=slots, label=label, path=path,
                       expert_bytes=args.expert_bytes, resamples=args.resamples)
    except PolicyHookError as exc:
        raise PolicyError(f"{label}: {exc}") from exc
    except ValueError as exc:
        raise OptionError(f"{label}: {exc}") from exc


def flag_notes(args: argparse.Namespace) -> list[str]:
    """Flags given that change nothing here, said in a note rather than silently ignored."""
    out = input_notes(args)
    if args.pool is not None and args.capacity is None and args.slots is not None:
        out.append(f"--pool {args.pool}: no effect: it sets the layout of --capacity; "
                   "--slots always sizes one global pool")
    if args.json and args.per_layer:
        out.append("--per-layer: no effect with --json (every row has per_layer)")
    return out


def _plot(rows: list[Row], path: Path) -> None:
    from cache_policies.plot import plot_hit_rates

    try:
        write_output(path, "--plot", lambda p: plot_hit_rates(rows, p))
    except RuntimeError as exc:  # matplotlib missing
        raise OptionError(str(exc)) from exc
    print(f"wrote {path}", file=sys.stderr)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. lru,opt")
    return names


def _positive(text: str) -> int:
    return _at_least(text, 1)


def _count(text: str) -> int:
    return _at_least(text, 0)


def _at_least(text: str, smallest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < smallest:
        raise argparse.ArgumentTypeError(f"must be >= {smallest}, got {value}")
    return value


def _sizes(text: str) -> list[int] | str:
    try:
        return parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---- recording: offload-rt trace / --trace -------------------------------------------------------


def add_trace_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Flags for writing a routing trace (``--trace FILE``; ``trace_kwargs`` reads the rest).

    ``args.trace_output`` is None unless a trace was asked for (``required``: it must be).
    """
    group = parser.add_argument_group("trace")
    group.add_argument("--trace", "-o", "--output", dest="trace_output", metavar="FILE",
                       type=Path, required=required,
                       help="write the routing trace to FILE; .gz compresses "
                            "(e.g. run.trace.jsonl.gz)")
    group.add_argument("--trace-precision", metavar="N", type=int, default=4,
                       help="decimals kept of probabilities; -1 = exact (default: %(default)s)")
    group.add_argument("--no-trace-probs", dest="trace_probs", action="store_false",
                       help="leave out router probabilities (much smaller prefill records)")


def trace_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``record_trace`` keyword arguments from ``add_trace_options`` flags."""
    precision = None if args.trace_precision < 0 else args.trace_precision
    return {"precision": precision, "probs": args.trace_probs}


def add_trace_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None
                     ) -> argparse.ArgumentParser:
    """Register ``trace``: generate for one or more prompts and write their routing trace."""
    from offload_rt.cli_options import (
        add_model_argument,
        add_runtime_arguments,
        add_sampling_arguments,
    )

    parser = subparsers.add_parser(
        "trace", parents=parents or [], help="record a routing trace for the simulator",
        description="Generate for each prompt with the given runtime options and write every "
                    "routing decision (and prefetch prediction) to a trace file. Without "
                    "MODEL_DIR: the shipped demo model, with the same default cache as "
                    "generate.")
    add_model_argument(parser)
    prompts = parser.add_argument_group("prompts (repeatable, run in order)")
    prompts.add_argument("--prompt", metavar="TEXT", action="append", default=[])
    prompts.add_argument("--prompt-ids", metavar="IDS", action="append", default=[],
                         type=_token_ids, help="comma-separated token ids")
    prompts.add_argument("--prompts-file", metavar="FILE", type=Path,
                         help="one prompt per line")
    add_trace_options(parser, required=True)
    add_sampling_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(run=run_trace)
    return parser


def run_trace(args: argparse.Namespace) -> int:
    """Check every flag and input, load, generate for each prompt, write the trace."""
    import offload_rt
    from offload_rt.cli_checks import (
        check_sampling_fields,
        check_sampling_flags,
        require_tokenizer,
    )
    from offload_rt.cli_options import model_dir, runtime_options, sampling_kwargs
    from offload_rt.trace_recorder import record_trace

    texts = [check_text(text, "--prompt") for text in args.prompt]
    if args.prompts_file is not None:
        texts += read_prompts_file(args.prompts_file)
    prompts: list[str | list[int]] = [*texts, *args.prompt_ids]
    if not prompts:
        raise OptionError("give at least one --prompt, --prompt-ids or --prompts-file")
    if texts:
        require_tokenizer(model_dir(args), "text prompts", "give them as token ids with "
                          "--prompt-ids 1,2,3")
    check_sampling_flags(args)
    check_output_path(args.trace_output, "--output")
    request = sampling_kwargs(args)
    check_sampling_fields(model_dir(args), args, request["temperature"])
    max_new = request.pop("max_new_tokens")
    source = str(args.prompts_file) if args.prompts_file else "command line"
    with offload_rt.load(model_dir(args), **runtime_options(args)) as rt:
        trace = record_trace(rt, None, prompts, max_new, metadata={"sampling": request},
                             prompt_source=source, **trace_kwargs(args), **request)
    write_output(args.trace_output, "--output", lambda p: write_trace(p, trace))
    print(f"wrote {args.trace_output}: {len(trace.records)} records, {trace.num_tokens} tokens",
          file=sys.stderr)
    return 0


def read_prompts_file(path: Path) -> list[str]:
    """The non-blank lines of ``--prompts-file``, decoded strictly as UTF-8 (one leading byte
    order mark removed); OptionError naming the file when it is missing or unreadable, or the
    first bad byte and its offset."""
    source = f"--prompts-file {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptionError(f"{source}: cannot read it: {exc.strerror or exc}") from exc
    text = decode_text(data, source).removeprefix(BOM)
    return [line for line in text.splitlines() if line.strip()]


def _token_ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") \
            from exc
