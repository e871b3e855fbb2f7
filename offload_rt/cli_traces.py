"""The TRACE inputs shared by ``simulate`` and ``trace-stats``: files, or a synthetic trace.

``add_trace_inputs`` registers the TRACE files and the ``--synthetic`` knobs; ``load_traces``
returns ``(label, path, trace)`` for each, a label being the file name with as many parent
folders as it takes to tell the files apart; ``input_notes`` names the knobs given that have no
effect (synthetic knobs next to TRACE files).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cache_policies.synthetic import SyntheticSpec, SyntheticSpecError, synthetic_trace
from cache_policies.trace import Trace, read_trace, write_trace
from offload_rt.cli_checks import write_output
from offload_rt.errors import OptionError

SYNTHETIC_FLAGS = {"layers": "num_layers", "experts": "num_experts", "top_k": "top_k",
                   "tokens": "tokens", "prefill": "prefill", "zipf": "zipf",
                   "locality": "locality", "layer_skew": "layer_skew",
                   "predict_accuracy": "predict_accuracy", "seed": "seed",
                   "sequences": "sequences"}


def add_trace_inputs(parser: argparse.ArgumentParser) -> None:
    """TRACE files, and the synthetic-trace group (knobs default to None: unset)."""
    parser.add_argument("traces", metavar="TRACE", nargs="*", type=Path,
                        help="trace files (.jsonl or .jsonl.gz)")
    d = SyntheticSpec()
    g = parser.add_argument_group("synthetic trace (instead of TRACE files)")
    g.add_argument("--synthetic", action="store_true", help="generate a trace; no model needed")
    g.add_argument("--layers", metavar="N", type=int, help=f"default: {d.num_layers}")
    g.add_argument("--experts", metavar="N", type=int, help=f"default: {d.num_experts}")
    g.add_argument("--top-k", metavar="K", type=int, help=f"default: {d.top_k}")
    g.add_argument("--tokens", metavar="N", type=int, help=f"decode tokens (default: {d.tokens})")
    g.add_argument("--prefill", metavar="N", type=int, help="prompt tokens in one prefill "
                   f"call first (default: {d.prefill})")
    g.add_argument("--zipf", metavar="S", type=float, help=f"popularity exponent (default: "
                   f"{d.zipf})")
    g.add_argument("--locality", metavar="P", type=float, help="probability a token reuses the "
                   f"previous token's experts (default: {d.locality})")
    g.add_argument("--layer-skew", metavar="X", type=float, help="0..1: spread of the Zipf "
                   f"exponent over layers (default: {d.layer_skew})")
    g.add_argument("--predict-accuracy", metavar="P", type=float, help="record next-layer "
                   "predictions right with this probability (default: none)")
    g.add_argument("--sequences", metavar="N", type=int, help="generations, each a prefill "
                   f"then the decode tokens; intervals need >= 2 (default: {d.sequences})")
    g.add_argument("--seed", metavar="S", type=int, help=f"default: {d.seed}")
    g.add_argument("--save-trace", metavar="FILE", type=Path, help="write the synthetic trace")


def load_traces(args: argparse.Namespace) -> list[tuple[str, str, Trace]]:
    """``(label, path, trace)`` per TRACE file, or the synthetic trace (``--save-trace``
    written); ``OptionError`` for neither or both, a file that is not a trace or holds no records,
    or bad knobs."""
    if bool(args.traces) == bool(args.synthetic):
        raise OptionError("give TRACE files or --synthetic (one of the two)")
    if not args.synthetic:
        try:
            traces = [read_trace(path) for path in args.traces]
        except ValueError as exc:
            raise OptionError(str(exc)) from exc
        empty = next((path for path, trace in zip(args.traces, traces) if not trace.records), None)
        if empty is not None:  # nothing to replay or count: every rate would be 0/0
            raise OptionError(f"{empty}: the trace has no records")
        return list(zip(short_labels(args.traces), map(str, args.traces), traces))
    knobs = {field: getattr(args, flag) for flag, field in SYNTHETIC_FLAGS.items()
             if getattr(args, flag) is not None}
    try:
        spec = SyntheticSpec(**knobs)
    except SyntheticSpecError as exc:
        raise OptionError(f"--synthetic {_flag(exc.field)} {exc.value}: {exc.rule}") from exc
    trace = synthetic_trace(spec)
    if args.save_trace is not None:
        write_output(args.save_trace, "--save-trace", lambda p: write_trace(p, trace))
    return [("synthetic", str(args.save_trace or ""), trace)]


def _flag(field: str) -> str:
    """The flag that sets ``SyntheticSpec.<field>``."""
    flag = next(flag for flag, name in SYNTHETIC_FLAGS.items() if name == field)
    return "--" + flag.replace("_", "-")


def short_labels(paths: list[Path]) -> list[str]:
    """Each path's file name, with as many parent folders as it takes to tell them apart."""
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


def input_notes(args: argparse.Namespace) -> list[str]:
    """Synthetic knobs (and --save-trace) given next to TRACE files: they change nothing."""
    if args.synthetic:
        return []
    unused = [f"--{name.replace('_', '-')}" for name in (*SYNTHETIC_FLAGS, "save_trace")
              if getattr(args, name) is not None]
    if not unused:
        return []
    return [f"{', '.join(unused)}: no effect without --synthetic (TRACE files were given)"]
