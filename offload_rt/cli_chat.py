"""``offload-rt chat``: an interactive multi-turn chat with streamed answers.

Reads questions line by line from a terminal (with a prompt, line editing and history) or from
a pipe (no prompt), so ``echo "hi" | offload-rt chat`` works. Commands: /reset, /stats, /help,
/exit. After each answer a one-line summary (tokens/s, expert-cache hit rate, bytes moved) goes
to stderr. On a terminal, Ctrl-C stops an answer (it is left out of the conversation) and
Ctrl-C or Ctrl-D at an empty prompt ends the session.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import offload_rt
from offload_rt.chat import ChatSession
from offload_rt.chat_input import (
    PipeInput,
    default_history_file,
    escape_undecodable_bytes,
    terminal_input,
)
from offload_rt.cli_checks import check_sampling_fields, check_sampling_flags, require_tokenizer
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
from offload_rt.cli_stream import EXIT_STATUS, ctrl_c_cancels, stream_pieces
from offload_rt.engine.sizes import format_size
from offload_rt.errors import ContextLengthError, OptionError
from offload_rt.generation_config import read_generation_config
from offload_rt.text_input import check_text

if TYPE_CHECKING:  # the runtime imports torch: only when a command runs a model
    from offload_rt.runtime import Runtime

COMMANDS = "/reset (forget the conversation), /stats, /help, /exit"
HELP = (f"commands: {COMMANDS}; a line starting with // is sent as a question starting with /; "
        "Ctrl-C stops an answer, Ctrl-D exits")
TOTALS = ("tokens", "hits", "misses", "bytes_moved", "prefetch_useful", "prefetch_wasted")
# chat's own defaults, for a model whose generation_config.json sets none (its do_sample /
# max_new_tokens win: see cli_options.sampling_kwargs)
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 200}


class LineSource(Protocol):
    """``chat_input.PipeInput`` or ``TerminalInput``: ``read()`` gives the next line, or None
    when the session should end."""

    def read(self) -> str | None: ...


def add_chat_parser(subparsers: Any,
                    parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", parents=parents, help="chat with a model",
                                   description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--system", metavar="TEXT", help="system prompt for the conversation")
    history = parser.add_mutually_exclusive_group()
    history.add_argument("--history-file", metavar="FILE", type=Path,
                         help="where a terminal session keeps the lines typed, for Up/Down and "
                              "Ctrl-R in later sessions (default: $XDG_STATE_HOME/offload_rt/"
                              "chat_history, else ~/.local/state/offload_rt/chat_history)")
    history.add_argument("--no-history-file", action="store_true",
                         help="keep the typed lines for this session only, nothing on disk")
    add_sampling_arguments(parser, CHAT_SAMPLING)
    add_runtime_arguments(parser)
    parser.set_defaults(run=run_chat)
    return parser


def run_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    sampling = _checked_sampling(args)
    max_new = sampling.pop("max_new_tokens")
    with offload_rt.load(model_dir(args), progress=progress_bar(True),
                         **runtime_options(args)) as rt, _input(args, interactive) as lines:
        session = ChatSession(rt, system=args.system, max_new_tokens=max_new, sampling=sampling,
                              on_trim=lambda n: _trim_notice(n, sys.stderr),
                              max_new_tokens_source=_max_new_tokens_source(args))
        if interactive:
            print(f"offload-rt chat: {rt.checkpoint.model_dir.name}. {HELP}", file=sys.stderr)
        _loop(session, lines, sys.stdout, sys.stderr, interactive)
    return 0


def _checked_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The session's sampling keywords, every flag checked before the model loads: --system and
    --stop as UTF-8, --seed's range, a tokenizer for the typed lines, and sampling that the
    model's generation_config.json refuses (chat samples by default)."""
    folder = model_dir(args)
    if args.system is not None:
        check_text(args.system, "--system")
    check_sampling_flags(args)
    require_tokenizer(folder, "the lines of a chat", "offload-rt generate --prompt-ids 1,2,3 "
                      "runs a model without one")
    sampling = sampling_kwargs(args)
    check_sampling_fields(folder, args, sampling["temperature"], CHAT_SAMPLING["temperature"])
    return sampling


def _max_new_tokens_source(args: argparse.Namespace) -> str:
    """Where the session's max_new_tokens comes from ("" for --max-new-tokens)."""
    if args.max_new_tokens is not None:
        return ""
    shipped = read_generation_config(model_dir(args))
    if shipped.max_new_tokens is not None:
        return shipped.new_tokens_source(None)
    return f"chat's default ({CHAT_SAMPLING['max_new_tokens']})"


@contextlib.contextmanager
def _input(args: argparse.Namespace, interactive: bool) -> Iterator[LineSource]:
    """Terminal (readline, history file) or pipe; stdin decoded with surrogateescape."""
    escape_undecodable_bytes(sys.stdin)
    if not interactive:
        yield PipeInput(sys.stdin)
        return
    history = None if args.no_history_file else args.history_file or default_history_file()
    with terminal_input(sys.stdout, history) as terminal:
        yield terminal


def _trim_notice(dropped: int, err: IO[str]) -> None:
    what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
    print(f"(context full: dropped {what})", file=err, flush=True)


def _loop(session: ChatSession, lines: LineSource, out: IO[str], err: IO[str],
          interactive: bool) -> None:
    chat = _ChatLoop(session, out, err, interactive)
    for number, line in enumerate(iter(lines.read, None), 1):
        text = line.strip()
        if text and not chat.line(text, number):
            return


@dataclass
class _ChatLoop:
    """What one line does: refused, a /command, or a question answered on ``out``."""

    session: ChatSession
    out: IO[str]
    err: IO[str]
    interactive: bool
    totals: Counter[str] = field(default_factory=Counter)

    def line(self, text: str, number: int) -> bool:
        """Handle one non-empty line (``number`` counts from 1); False means exit."""
        try:
            check_text(text, "this line" if self.interactive else f"line {number} of stdin")
        except OptionError as exc:  # this line only: nothing reaches the model
            self._note(f"(not sent: {exc})")
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.command(text)
        try:
            self.answer(text.removeprefix("/"))  # "//..." asks a question starting with "/"
        except ContextLengthError as exc:  # this question only: keep the conversation going
            self._note(f"(not answered: {exc})")
        except OptionError as exc:  # the chat template refused the conversation so far
            if not self.session.history:  # even a first question: no question can be asked
                raise
            self._note(f"(not answered: {exc}; /reset starts a new conversation)")
        return True

    def command(self, text: str) -> bool:
        """Run a /command; False means exit."""
        name = text.split()[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.session.reset()
            reply = "(conversation cleared)"
        elif name == "/stats":
            reply = _stats_text(self.session.runtime, self.totals)
        elif name == "/help":
            reply = HELP
        else:
            reply = f"unknown command {name}; commands: {COMMANDS}"
        print(reply, file=self.out, flush=True)
        return True

    def answer(self, question: str) -> None:
        """Stream the answer, then its summary line on ``err``. On a terminal Ctrl-C stops it."""
        start = time.perf_counter()
        rt = self.session.runtime
        with ctrl_c_cancels(rt) if self.interactive else contextlib.nullcontext():
            stream_pieces(self.session.reply(question), self.out)
        stats = rt.stats_dict(time.perf_counter() - start)
        self.totals["answers"] += 1
        for key in TOTALS:
            self.totals[key] += stats.get(key, 0)
        reason = rt.last_result.finish_reason if rt.last_result else None
        if reason == "cancelled":
            self._note("(answer stopped; left out of the conversation)")
        self._note(f"[{summary_line(stats, reason)}]")

    def _note(self, text: str) -> None:
        print(text, file=self.err, flush=True)


def _prefetch_text(rt: Runtime) -> str:
    """'2', or '2-4 adaptive, now 4' where the depth adapts (``engine.prefetch_depth``)."""
    adaptive = getattr(rt.experts, "adaptive", None)
    if adaptive is None:
        return str(rt.options.prefetch)
    return f"{adaptive.floor}-{adaptive.ceiling} adaptive, now {adaptive.depth}"


def _stats_text(rt: Runtime, totals: Counter[str]) -> str:
    lookups = totals["hits"] + totals["misses"]
    lines = [f"answers: {totals['answers']}, tokens: {totals['tokens']}",
             (f"offloaded: {rt.offloaded}, policy: {rt.options.policy}, "
              f"prefetch: {_prefetch_text(rt)}, device slots: {rt.plan.device_slots}")]
    if lookups:
        lines.append(f"expert cache: {totals['hits']} hits, {totals['misses']} misses, hit rate "
                     f"{totals['hits'] / lookups:.1%}, {format_size(totals['bytes_moved'])} moved,"
                     f" prefetch {totals['prefetch_useful']} useful / "
                     f"{totals['prefetch_wasted']} wasted")
    return "\n".join(lines)
