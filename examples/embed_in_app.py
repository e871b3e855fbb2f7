"""Embedding offload_rt in a desktop app: answer in a worker thread, let the user press Stop.

    python examples/embed_in_app.py                         # the shipped demo model
    python examples/embed_in_app.py MODEL_DIR [--cache-experts K] [--stop-after N]

The UI thread never runs the model. A worker thread iterates ``Runtime.stream`` and hands the
pieces over a queue; the UI shows them as they come and may call ``Runtime.cancel()`` at any
moment (here after N pieces, as if the user pressed Stop): the worker ends within one token.
A runtime runs one generation at a time; a second request meanwhile raises ``BusyError``
(refused, not queued), so an app disables its Send button or cancels first.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from pathlib import Path

import offload_rt
from offload_rt.demo import DEMO_CACHE_EXPERTS, demo_model_dir
from offload_rt.errors import OffloadError

MESSAGE = "Write a short poem about the sea."
DONE = None  # the worker's last item on the queue


def answer_in_background(rt: offload_rt.Runtime, message: str,
                         pieces: queue.Queue[str | OffloadError | None]) -> threading.Thread:
    """Start streaming the reply to ``message``; pieces (or an error), then DONE, go to ``pieces``."""

    def work() -> None:
        try:
            for piece in rt.stream(messages=[{"role": "user", "content": message}],
                                   max_new_tokens=64):
                pieces.put(piece)
        except OffloadError as exc:
            pieces.put(exc)
        finally:
            pieces.put(DONE)

    worker = threading.Thread(target=work, name="answer", daemon=True)
    worker.start()
    return worker


def show_reply(rt: offload_rt.Runtime, pieces: queue.Queue[str | OffloadError | None],
               stop_after: int) -> None:
    """The UI side: print pieces as they arrive; press 'Stop' after ``stop_after`` of them."""
    shown = 0
    while (item := pieces.get()) is not DONE:
        if isinstance(item, OffloadError):
            print(f"\n[error: {item}]")
            continue
        print(item, end="", flush=True)
        shown += 1
        if shown == stop_after:
            rt.cancel()  # any thread may call it
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, help="default: the demo model")
    parser.add_argument("--cache-experts", type=int, help="device expert slots per layer")
    parser.add_argument("--stop-after", type=int, default=12, metavar="N",
                        help="press Stop after N pieces (default: %(default)s)")
    args = parser.parse_args(argv)
    cache = args.cache_experts
    if args.model_dir is None and cache is None:
        cache = DEMO_CACHE_EXPERTS  # part of the demo's experts, so offloading shows
    try:
        with offload_rt.load(args.model_dir or demo_model_dir(), cache_experts=cache) as rt:
            pieces: queue.Queue[str | OffloadError | None] = queue.Queue(maxsize=1)
            print(f"> {MESSAGE}")
            worker = answer_in_background(rt, MESSAGE, pieces)
            show_reply(rt, pieces, args.stop_after)
            worker.join()
            report(rt)
            follow_up = rt.generate(messages=[{"role": "user", "content": "Thanks!"}],
                                    max_new_tokens=8)  # the runtime is free again
            print(f"follow-up answer ({follow_up.finish_reason}): {follow_up.text.strip()}")
    except OffloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def report(rt: offload_rt.Runtime) -> None:
    result, stats = rt.last_result, rt.stats_dict()
    assert result is not None
    print(f"finish reason: {result.finish_reason}, {len(result.token_ids)} tokens, "
          f"{stats['decode_tokens_per_s']:.1f} tok/s, first token "
          f"{stats['time_to_first_token_s']:.3f} s")
    if stats["offloaded"]:
        print(f"expert cache: {stats['hits']} hits, {stats['misses']} misses, hit rate "
              f"{stats['hit_rate']:.1%}, {stats['bytes_moved'] / 2**20:.1f} MiB moved, "
              f"prefetch {stats['prefetch_useful']} useful / {stats['prefetch_wasted']} wasted")
    else:
        print("expert cache: off (every expert fits in memory)")


if __name__ == "__main__":
    sys.exit(main())
