"""``offload-rt chat``: an interactive multi-turn chat with streamed answers.

Reads questions line by line from a terminal (with a prompt) or from a pipe (no prompt), so
``echo "hi" | offload-rt chat`` works. Commands: /reset, /stats, /help, /exit. After each answer a
one-line summary (tokens/s, expert-cache hit rate, bytes moved) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import IO, TYPE_CHECKING, Any

import offload_rt
from offload_rt.chat import ChatSession
from offload_rt.cli_generate import summary_line
from offload_rt.cli_options import (
    add_model_argument,
    add_runtime_arguments,
    add_sampling_arguments,
    model_dir,
    progress_bar,
    runtime_options,
    sampling_kwargs,
)
from offload_rt.engine.sizes import format_size
from offload_rt.errors import ContextLengthError

if TYPE_CHECKING:  # the runtime imports torch: only when a command runs a model
    from offload_rt.runtime import Runtime

HELP = "commands: /reset (forget the conversation), /stats, /help, /exit"
TOTALS = ("tokens", "hits", "misses", "bytes_moved", "prefetch_useful", "prefetch_wasted")


def add_chat_parser(subparsers: Any,
                    parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", parents=parents, help="chat with a model",
                                   description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    parser.add_argument("--system", metavar="TEXT", help="system prompt for the conversation")
    add_sampling_arguments(parser)
    parser.set_defaults(temperature=0.7, top_p=0.9, max_new_tokens=200, seed=None)
    add_runtime_arguments(parser)
    parser.set_defaults(run=run_chat)
    return parser


def run_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    sampling = sampling_kwargs(args)
    max_new = sampling.pop("max_new_tokens")
    with offload_rt.load(model_dir(args), progress=progress_bar(True),
                         **runtime_options(args)) as rt:
        session = ChatSession(rt, system=args.system, max_new_tokens=max_new, sampling=sampling)
        if interactive:
            print(f"offload-rt chat: {rt.checkpoint.model_dir.name}. {HELP}", file=sys.stderr)
        _loop(session, sys.stdin, sys.stdout, sys.stderr, interactive)
    return 0


def _read(stdin: IO[str], interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = stdin.readline()
    return line if line else None


def _loop(session: ChatSession, stdin: IO[str], out: IO[str], err: IO[str],
          interactive: bool) -> None:
    totals: Counter[str] = Counter()
    while (line := _read(stdin, interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(text, session, totals, out):
                return
            continue
        try:
            _answer(session, text, out, err, totals)
        except ContextLengthError as exc:  # this question only: keep the conversation going
            print(f"(not answered: {exc})", file=err, flush=True)


def _command(text: str, session: ChatSession, totals: Counter[str], out: IO[str]) -> bool:
    """Run a /command; False means exit."""
    name = text.split()[0].lower()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=out, flush=True)
    elif name == "/stats":
        print(_stats_text(session.runtime, totals), file=out, flush=True)
    else:
        print(HELP, file=out, flush=True)
    return True


def _answer(session: ChatSession, question: str, out: IO[str], err: IO[str],
            totals: Counter[str]) -> None:
    start = time.perf_counter()
    for piece in session.reply(question):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    rt = session.runtime
    stats = rt.stats_dict(time.perf_counter() - start)
    totals["answers"] += 1
    for key in TOTALS:
        totals[key] += stats.get(key, 0)
    reason = rt.last_result.finish_reason if rt.last_result else None
    print(f"[{summary_line(stats, reason)}]", file=err, flush=True)


def _stats_text(rt: Runtime, totals: Counter[str]) -> str:
    lookups = totals["hits"] + totals["misses"]
    lines = [f"answers: {totals['answers']}, tokens: {totals['tokens']}",
             (f"offloaded: {rt.offloaded}, policy: {rt.options.policy}, "
              f"prefetch: {rt.options.prefetch}, device slots: {rt.plan.device_slots}")]
    if lookups:
        lines.append(f"expert cache: {totals['hits']} hits, {totals['misses']} misses, hit rate "
                     f"{totals['hits'] / lookups:.1%}, {format_size(totals['bytes_moved'])} moved,"
                     f" prefetch {totals['prefetch_useful']} useful / "
                     f"{totals['prefetch_wasted']} wasted")
    return "\n".join(lines)
