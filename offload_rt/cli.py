"""The ``offload-rt`` command: parse, hand over to a subcommand, turn errors into exit codes.

Each subcommand lives in its own module and registers itself with one function
``add_<name>_parser(subparsers, parents) -> ArgumentParser`` that sets ``run=`` (a function
``run(args) -> int``) as a parser default. Adding ``chat`` or ``bench`` is one import and one entry
in ``SUBCOMMANDS``; nothing here changes otherwise.

Exit codes (``EXIT_STATUS``, also shown by ``offload-rt --help``): 0 success; 2 a usage error
or any ``OffloadError`` (one ``offload-rt: error: ...`` line on stderr, no traceback); 130
interrupted (Ctrl-C); 1 stdout closed early (broken pipe, e.g. ``| head``): the rest of the
output is dropped without a message, as Unix filters do, for every subcommand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from offload_rt import __version__
from offload_rt.cli_bench import add_bench_parser
from offload_rt.cli_chat import add_chat_parser
from offload_rt.cli_generate import add_generate_parser
from offload_rt.cli_quantize import add_quantize_parser
from offload_rt.cli_serve import add_serve_parser
from offload_rt.cli_simulate import add_simulate_parser, add_trace_parser
from offload_rt.cli_stream import EXIT_STATUS
from offload_rt.cli_trace_stats import add_trace_stats_parser
from offload_rt.errors import OffloadError

PROG = "offload-rt"
SUBCOMMANDS: tuple[Callable[..., argparse.ArgumentParser], ...] = (
    add_generate_parser, add_chat_parser, add_bench_parser, add_trace_parser, add_simulate_parser,
    add_trace_stats_parser,
    add_quantize_parser, add_serve_parser)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, "
                               "OLMoE) with expert offloading.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (INFO) to stderr")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.run(args))
    except OffloadError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`). Point stdout at devnull so the interpreter's
        # final flush does not raise a second time, as the Python docs recommend.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
