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
from typing import IO, TYPE_CHECKING, Any

import offload_rt
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
from offload_rt.engine.sizes import format_size
from offload_rt.errors import OptionError
from offload_rt.text_input import check_text, decode_text

if TYPE_CHECKING:  # the runtime imports torch: only when a command runs a model
    from offload_rt.runtime import Output, Runtime


def add_generate_parser(subparsers: Any,
                        parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``generate`` on the top-level parser's subparsers."""
    parser = subparsers.add_parser(
        "generate", parents=parents, help="generate text from one prompt",
        description="Generate text from one prompt. Text streams to stdout and a summary "
                    "line goes to stderr; with --json, stdout is one JSON object instead.")
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
                             "from stdin (one trailing newline removed)")
    source.add_argument("--prompt-ids", metavar="IDS", type=_token_ids,
                        help="prompt as comma-separated token ids, e.g. 1,2,3 (works for a "
                             "model folder without a tokenizer)")
    group.add_argument("--chat", action="store_true",
                       help="wrap the prompt as one user message in the model's chat template")










def run_generate(args: argparse.Namespace) -> int:
    """Load the model, generate, print; errors propagate to ``cli.main``."""
    request = {**prompt_kwargs(args, sys.stdin), **sampling_kwargs(args)}
    with offload_rt.load(model_dir(args), progress=progress_bar(not args.json),
                         **runtime_options(args)) as rt:
        if args.trace_output is not None:
            output = traced_generate(rt, request, args)
            print(output_json(output) if args.json else output.text, flush=True)
            if not args.json:
                print(summary_line(output.stats, output.finish_reason), file=sys.stderr)
        elif args.json:
            print(output_json(rt.generate(**request)), flush=True)
        else:
            print_stream(rt, request, sys.stdout, sys.stderr)
    return 0


def traced_generate(rt: Runtime, request: dict[str, Any], args: argparse.Namespace) -> Output:
    """``generate`` with its routing recorded to ``--trace FILE`` (see docs/trace_format.md)."""
    from offload_rt.runtime import Output
    from offload_rt.trace_recorder import record_trace

    request = dict(request)
    max_new = request.pop("max_new_tokens")
    prompt = rt.encode(request.pop("prompt", None), messages=request.pop("messages", None))
    start = time.perf_counter()
    record_trace(rt, args.trace_output, [prompt], max_new, prompt_source="offload-rt generate",
                 **trace_kwargs(args), **request)
    result = rt.last_result
    assert result is not None
    return Output(result.text, prompt, list(result.token_ids), result.finish_reason,
                  rt.stats_dict(time.perf_counter() - start))


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
    """The prompt piped in, one trailing newline removed; its bytes are decoded strictly in
    stdin's encoding, so bad bytes are an OptionError naming their offset (``decode_text``)."""
    source = "--prompt - (stdin)"
    raw = getattr(stdin, "buffer", None)
    if raw is None:  # a text stream with no bytes underneath (io.StringIO)
        return check_text(stdin.read(), source).removesuffix("\n")
    text = decode_text(raw.read(), source, stdin.encoding or "utf-8")
    # as text mode reads it (universal newlines): a Windows "\r\n" becomes "\n"
    return text.replace("\r\n", "\n").replace("\r", "\n").removesuffix("\n")


def print_stream(rt: Runtime, request: dict[str, Any], out: IO[str], err: IO[str]) -> None:
    """Write text pieces as they come, then a newline; then the summary line on ``err``."""
    start = time.perf_counter()
    for piece in rt.stream(**request):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
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

