"""``offload-rt simulate`` (replay traces through policies) and ``offload-rt trace`` (record one).

    offload-rt trace [MODEL_DIR] --prompt "Hello" --max-new-tokens 64 -o run.trace.jsonl.gz
    offload-rt simulate run.trace.jsonl.gz --policies lru,lfu,opt --capacity 2,4,6 --plot hr.png
    offload-rt simulate --synthetic --layers 32 --experts 8 --tokens 2000 --zipf 1.1

Both only parse and call: ``offload_rt.trace_recorder`` records, ``cache_policies.sim_report``
replays and tabulates, ``cache_policies.plot`` draws.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cache_policies.policy_errors import PolicyHookError
from cache_policies.sim_report import DEFAULT_POLICIES, Row, compare, format_table, rows_json
from cache_policies.synthetic import SyntheticSpec, synthetic_trace
from cache_policies.trace import Trace, read_trace, write_trace
from offload_rt.cli_checks import check_output_path, write_output
from offload_rt.errors import OptionError, PolicyError
from offload_rt.text_input import BOM, check_text, decode_text

DEFAULT_CAPACITIES = (2, 4, 6)


def add_simulate_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None
                        ) -> argparse.ArgumentParser:
    """Register ``simulate`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "simulate", parents=parents or [], help="replay routing traces through cache policies",
        description="Replay routing traces (from `offload-rt trace`, or synthetic ones) through "
                    "expert-cache eviction policies at several capacities, next to the optimal "
                    "(Belady) policy. Prints a table, or one JSON line with --json.")
    parser.add_argument("traces", metavar="TRACE", nargs="*", type=Path,
                        help="trace files (.jsonl or .jsonl.gz)")
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--policies", metavar="LIST", type=_names, default=list(DEFAULT_POLICIES),
                     help="comma-separated policy names or pkg.module:Class paths "
                          f"(default: {','.join(DEFAULT_POLICIES)})")
    sim.add_argument("--capacity", metavar="LIST", type=_ints, default=None,
                     help="expert slots per layer to try, comma-separated, each from the "
                          "trace's top_k to its experts per layer (what the runtime accepts "
                          "as --cache-experts; others are refused); a global pool gets this "
                          "many times the number of layers (default: those of 2,4,6 in that "
                          "range, else top_k)")
    sim.add_argument("--pool", choices=("layer", "global"), default="layer",
                     help="a pool per layer, or one shared pool (default: %(default)s)")
    sim.add_argument("--prefetch", action="store_true",
                     help="model prefetch: recorded predictions are loaded before the next "
                          "layer runs (opt stays demand-only; a trace recorded with "
                          "--prefetch 0 has none: a note says so)")
    sim.add_argument("--expert-bytes", metavar="N", type=_positive, default=None,
                     help="bytes of one expert for MB/token, >= 1 (default: the trace's)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    out.add_argument("--per-layer", action="store_true", help="add per-layer hit rates to the table")
    out.add_argument("--plot", metavar="PNG", type=Path, help="also write a hit-rate plot (needs "
                     "matplotlib: pip install '.[plot]' in the source tree)")
    _add_synthetic_arguments(parser)
    parser.set_defaults(run=run_simulate)
    return parser


def _add_synthetic_arguments(parser: argparse.ArgumentParser) -> None:
    d = SyntheticSpec()
    g = parser.add_argument_group("synthetic trace (instead of TRACE files)")
    g.add_argument("--synthetic", action="store_true", help="generate a trace; no model needed")
    g.add_argument("--layers", metavar="N", type=int, default=d.num_layers, help="default: %(default)s")
    g.add_argument("--experts", metavar="N", type=int, default=d.num_experts, help="default: %(default)s")
    g.add_argument("--top-k", metavar="K", type=int, default=d.top_k, help="default: %(default)s")
    g.add_argument("--tokens", metavar="N", type=int, default=d.tokens, help="decode tokens "
                   "(default: %(default)s)")
    g.add_argument("--prefill", metavar="N", type=int, default=d.prefill, help="prompt tokens in one prefill "
                   "call first (default: %(default)s)")
    g.add_argument("--zipf", metavar="S", type=float, default=d.zipf, help="popularity exponent "
                   "(default: %(default)s)")
    g.add_argument("--locality", metavar="P", type=float, default=d.locality, help="probability a token "
                   "reuses the previous token's experts (default: %(default)s)")
    g.add_argument("--layer-skew", metavar="X", type=float, default=d.layer_skew, help="0..1: spread of the "
                   "Zipf exponent over layers (default: %(default)s)")
    g.add_argument("--predict-accuracy", metavar="P", type=float, default=None, help="record next-layer "
                   "predictions right with this probability (default: none)")
    g.add_argument("--seed", metavar="S", type=int, default=d.seed, help="default: %(default)s")
    g.add_argument("--save-trace", metavar="FILE", type=Path, help="write the synthetic trace")


def run_simulate(args: argparse.Namespace) -> int:
    """Load or generate traces, compare policies, print; errors become ``OptionError`` (a
    policy's own error ``PolicyError``, naming its class and hook)."""
    for path, flag in ((args.save_trace, "--save-trace"), (args.plot, "--plot")):
        if path is not None:
            check_output_path(path, flag)  # before the simulation, not after it
    rows: list[Row] = []
    for label, trace in _traces(args):
        capacities = _capacities(label, trace, args.capacity)
        try:
            rows += compare(trace, args.policies, capacities, per_layer=args.pool == "layer",
                            prefetch=args.prefetch, label=label, expert_bytes=args.expert_bytes)
        except PolicyHookError as exc:
            raise PolicyError(f"{label}: {exc}") from exc
        except ValueError as exc:
            raise OptionError(f"{label}: {exc}") from exc
    if args.plot is not None:
        _plot(rows, args.plot)
    print(rows_json(rows) if args.json else format_table(rows, per_layer=args.per_layer),
          flush=True)
    return 0


def _plot(rows: list[Row], path: Path) -> None:
    from cache_policies.plot import plot_hit_rates

    try:
        write_output(path, "--plot", lambda p: plot_hit_rates(rows, p))
    except RuntimeError as exc:  # matplotlib missing
        raise OptionError(str(exc)) from exc
    print(f"wrote {path}", file=sys.stderr)


def _capacities(label: str, trace: Trace, given: list[int] | None) -> list[int]:
    """The capacities to simulate: ``given``, refusing what the runtime refuses as
    --cache-experts (slots per layer, either pool); by default those of 2,4,6 it accepts."""
    top_k, experts = trace.header.top_k, trace.header.num_experts
    if given is None:
        return [c for c in DEFAULT_CAPACITIES if top_k <= c <= experts] or [top_k]
    for capacity in given:
        if capacity < top_k:
            raise OptionError(f"{label}: --capacity {capacity} is below the trace's top_k "
                              f"({top_k}): a token's top_k experts of a layer must be resident "
                              "together, and the runtime refuses --cache-experts below top_k")
        if capacity > experts:
            raise OptionError(f"{label}: --capacity {capacity} is above the trace's {experts} "
                              "experts per layer: every expert fits and none is ever evicted; "
                              "the runtime refuses --cache-experts above the number of experts")
    return given


def _traces(args: argparse.Namespace) -> list[tuple[str, Trace]]:
    if bool(args.traces) == bool(args.synthetic):
        raise OptionError("give TRACE files or --synthetic (one of the two)")
    if not args.synthetic:
        try:
            return [(path.name, read_trace(path)) for path in args.traces]
        except ValueError as exc:
            raise OptionError(str(exc)) from exc
    try:
        spec = SyntheticSpec(num_layers=args.layers, num_experts=args.experts, top_k=args.top_k,
                             tokens=args.tokens, prefill=args.prefill, zipf=args.zipf,
                             locality=args.locality, layer_skew=args.layer_skew,
                             predict_accuracy=args.predict_accuracy, seed=args.seed)
    except ValueError as exc:
        raise OptionError(f"--synthetic: {exc}") from exc
    trace = synthetic_trace(spec)
    if args.save_trace is not None:
        write_output(args.save_trace, "--save-trace", lambda p: write_trace(p, trace))
    return [("synthetic", trace)]


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. lru,opt")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,4,6, got {text!r}")
    return values


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
