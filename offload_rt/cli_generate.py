"""``offload-rt generate``: one prompt in; text streamed to stdout, or one JSON object.

The argument groups for runtime options (``add_runtime_arguments`` / ``runtime_options``) and
sampling (``add_sampling_arguments`` / ``sampling_kwargs``) are public so other subcommands
(chat, bench) can offer the same flags with the same meaning.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from typing import IO, TYPE_CHECKING, Any

import offload_rt
from cache_policies.trace import Trace, write_trace
from offload_rt.cli_checks import (
    check_output_path,
    check_sampling_fields,
    check_sampling_flags,
    require_tokenizer,
    write_output,
)
from offload_rt.cli_options import (
    add_model_argument,
    add_runtime_arguments,
    add_sampling_arguments,
    model_dir,
    progress_bar,
    runtime_options,
    sampling_kwargs,
)
from offload_rt.cli_simulate import add_trace_options, trace_kwargs
from offload_rt.cli_stream import EXIT_STATUS, stream_pieces
from offload_rt.engine.sizes import format_size
from offload_rt.errors import OptionError
from offload_rt.text_input import BOM, check_text, decode_text

if TYPE_CHECKING:  # the runtime imports torch: only when a command runs a model
    from offload_rt.runtime import Output, Runtime


def add_generate_parser(subparsers: Any,
                        parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``generate`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "generate", parents=parents, help="generate text from one prompt",
        description="Generate text from one prompt. Text streams to stdout and a summary line\n"
                    "goes to stderr; with --json, stdout is one JSON object instead.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    _add_prompt_arguments(parser)
    add_sampling_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object (ids, text, finish_reason, stats) instead of "
                          "streaming text")
    add_runtime_arguments(parser)
    add_trace_options(parser)
    parser.set_defaults(run=run_generate)
    return parser


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompt")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT",
                        help="prompt text, encoded as BOS + SentencePiece ids; '-' reads it "
                             "from stdin (one leading UTF-8 byte order mark and one trailing "
                             "newline removed)")
    source.add_argument("--prompt-ids", metavar="IDS", type=_token_ids,
                        help="prompt as comma-separated token ids, e.g. 1,2,3 (works for a "
                             "model folder without a tokenizer)")
    group.add_argument("--chat", action="store_true",
                       help="wrap the prompt as one user message in the model's chat template")


def run_generate(args: argparse.Namespace) -> int:
    """Check the flags, load the model, generate, print; errors propagate to ``cli.main``."""
    folder = model_dir(args)
    check_sampling_flags(args)
    if args.prompt is not None:
        require_tokenizer(folder, "--prompt text", "give the prompt as token ids with "
                          "--prompt-ids 1,2,3")
    if args.trace_output is not None:
        check_output_path(args.trace_output, "--trace")
    request = {**prompt_kwargs(args, sys.stdin), **sampling_kwargs(args)}
    check_sampling_fields(folder, args, request["temperature"])
    trace: Trace | None = None  # written last: a failed write (exit 2) follows the output
    with offload_rt.load(folder, progress=progress_bar(not args.json),
                         **runtime_options(args)) as rt:
        if args.json:
            output, trace = _json_output(rt, request, args)
            print(output_json(output), flush=True)
        elif args.trace_output is not None:
            output, trace = traced_generate(rt, request, args)
            print(output.text, flush=True)
            print(summary_line(output.stats, output.finish_reason), file=sys.stderr)
        else:
            print_stream(rt, request, sys.stdout, sys.stderr)
    if trace is not None:
        write_output(args.trace_output, "--trace", partial(write_trace, trace=trace))
    return 0


def _json_output(rt: Runtime, request: dict[str, Any], args: argparse.Namespace
                 ) -> tuple[Output, Trace | None]:
    """The run's ``Output`` for --json (and its trace with --trace). On Ctrl-C the object of
    what was generated so far is printed (``finish_reason`` "interrupted") before the
    KeyboardInterrupt goes on to the CLI (exit status 130): stdout always gets its object."""
    start = time.perf_counter()
    try:
        if args.trace_output is None:
            return rt.generate(**request), None
        return traced_generate(rt, request, args)
    except KeyboardInterrupt:
        so_far = interrupted_output(rt, time.perf_counter() - start)
        if so_far is not None:
            print(output_json(so_far), flush=True)
        raise


def interrupted_output(rt: Runtime, wall_s: float) -> Output | None:
    """What the generation interrupted in ``rt`` had produced (None if none had started)."""
    from offload_rt.runtime import Output

    result = rt.last_result
    if result is None:
        return None
    return Output(result.text, list(rt.last_prompt_ids), list(result.token_ids), "interrupted",
                  rt.stats_dict(wall_s))


def traced_generate(rt: Runtime, request: dict[str, Any], args: argparse.Namespace
                    ) -> tuple[Output, Trace]:
    """``generate`` with its routing recorded (see docs/trace_format.md); the caller writes the
    trace after printing the text, so a failed write loses no text."""
    from offload_rt.runtime import Output
    from offload_rt.trace_recorder import record_trace

    request = dict(request)
    max_new = request.pop("max_new_tokens")
    prompt = rt.encode(request.pop("prompt", None), messages=request.pop("messages", None))
    start = time.perf_counter()
    trace = record_trace(rt, None, [prompt], max_new, prompt_source="offload-rt generate",
                         **trace_kwargs(args), **request)
    result = rt.last_result
    assert result is not None
    return Output(result.text, prompt, list(result.token_ids), result.finish_reason,
                  rt.stats_dict(time.perf_counter() - start)), trace


def prompt_kwargs(args: argparse.Namespace, stdin: IO[str]) -> dict[str, Any]:
    """The prompt as ``Runtime.stream`` keywords: ``prompt=`` text or ids, or ``messages=``."""
    if args.prompt_ids is not None:
        if args.chat:
            raise OptionError("--chat needs --prompt TEXT, not --prompt-ids")
        return {"prompt": args.prompt_ids}
    text = read_stdin(stdin) if args.prompt == "-" else check_text(args.prompt, "--prompt")
    if args.chat:
        return {"messages": [{"role": "user", "content": text}]}
    return {"prompt": text}


def read_stdin(stdin: IO[str]) -> str:
    """The prompt piped in, one leading byte order mark (U+FEFF, as Windows editors save
    UTF-8) and one trailing newline removed; its bytes are decoded strictly in stdin's
    encoding, so bad bytes are an OptionError naming their offset (``decode_text``)."""
    source = "--prompt - (stdin)"
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream with no bytes underneath (io.StringIO)
        text = check_text(stdin.read(), source)
    else:
        text = decode_text(raw.read(), source, stdin.encoding or "utf-8")
        # as text mode reads it (universal newlines): a Windows "\r\n" becomes "\n"
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.removeprefix(BOM).removesuffix("\n")


def print_stream(rt: Runtime, request: dict[str, Any], out: IO[str], err: IO[str]) -> None:
    """Write text pieces as they come, then a newline; then the summary line on ``err``."""
    start = time.perf_counter()
    stream_pieces(rt.stream(**request), out)
    result = rt.last_result
    reason = result.finish_reason if result is not None else None
    print(summary_line(rt.stats_dict(time.perf_counter() - start), reason), file=err, flush=True)


def output_json(output: Output) -> str:
    """One line of JSON. ASCII-escaped, so no generated character can break the line."""
    return json.dumps({"prompt_token_ids": output.prompt_token_ids,
                       "token_ids": output.token_ids, "text": output.text,
                       "finish_reason": output.finish_reason, "stats": output.stats})


def summary_line(stats: dict[str, Any], finish_reason: str | None) -> str:
    """'8 tokens (length), 190.8 tok/s, first token 0.004 s[, experts: ...]'."""
    line = (f"{stats.get('tokens', 0)} tokens ({finish_reason}), "
            f"{stats.get('tokens_per_s', 0.0):.1f} tok/s, "
            f"first token {stats.get('time_to_first_token_s', 0.0):.3f} s")
    if stats.get("offloaded"):
        line += (f"; experts: hit rate {stats['hit_rate']:.1%} ({stats['hits']} hits, "
                 f"{stats['misses']} misses), {format_size(stats['bytes_moved'])} moved, "
                 f"stall {stats['stall_s']:.3f} s, prefetch {stats['prefetch_useful']} useful "
                 f"/ {stats['prefetch_wasted']} wasted")
        if stats.get("host_computed"):
            line += f", {stats['host_computed']} misses computed on the CPU"
    return line


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 1,2,3; got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative token ids; got {text!r}")
    return ids

